"""Personalize a model with edgetune from Python: train a LoRA adapter on a data file, watch
the loss, save the adapter in PEFT format, and compare answers before and after.

    cargo build --release -p edgetune-capi
    PYTHONPATH=bindings/python python3 bindings/python/examples/personalize.py \
        MODEL DATA.jsonl OUT_DIR [PROMPT]

MODEL is a Hugging Face folder or a .gguf file; DATA holds chat, instruction or text records.
"""

import sys

import edgetune


def main() -> None:
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    model_path, data, out = sys.argv[1:4]
    prompt = sys.argv[4] if len(sys.argv) == 5 else "Who are you?"

    # The model is freed at the end of the `with` block (or by model.close()).
    with edgetune.Model.load(model_path, max_context=512) as model:
        print("before:", model.generate(prompt, chat=True, max_new_tokens=40))

        # Any training setting of the CLI's TOML file, as a dict.
        settings = {"max_steps": 30, "learning_rate": 2e-3, "lora": {"r": 8}, "data": {"max_len": 256}}
        with model.trainer(settings) as trainer:
            trainer.add_file(data)
            # Records can also come from memory, e.g. from the app's own database.
            trainer.add_record({"instruction": "Say hello.", "output": "Hello from edgetune!"})

            # Iterating the events runs training on a worker thread; breaking out cancels it.
            for event in trainer.events():
                if event.kind == "step":
                    print(f"step {event.step}/{event.total_steps}  loss {event.loss:.3f}  "
                          f"{event.tokens_per_s:.0f} tok/s  eta {event.eta_s:.0f}s")
                elif event.kind == "eval":
                    print(f"validation loss {event.val_loss:.3f}")
                elif event.kind == "finished":
                    print("training", event.message)

            trainer.save_adapter(out)  # a PEFT folder that Hugging Face PEFT loads too
            print("PEFT adapter written to", out)
            with trainer.adapter() as adapter:
                model.set_adapter(adapter)  # the model keeps its own copy

        print("after: ", end="", flush=True)
        for piece in model.stream(prompt, chat=True, max_new_tokens=40):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    try:
        main()
    except edgetune.EdgetuneError as e:  # carries the library's message, e.g. a bad setting
        sys.exit(f"error ({e.status}): {e}")
