#!/usr/bin/env python3
"""Trains the job in this folder with TRL's SFTTrainer, as `edgetune train` would have trained it.

Written by `edgetune export-job --to trl`. The settings are in job.json, the data in data/ (the
batches edgetune would train, in its order), the starting adapter in init_adapter/. README.md
says what each setting became and how to launch on one GPU, several, or DeepSpeed ZeRO-2.

    accelerate launch --config_file accelerate/single_gpu.yaml train.py    # or: bash run.sh
    python train.py --f32                                                   # CPU or GPU, no 4-bit

The adapter is written to OUTPUT/adapter (a PEFT folder that edgetune, PEFT and vLLM load), and
the loss of every step to OUTPUT/losses.json.
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load_job(folder=HERE):
    with open(os.path.join(folder, "job.json")) as f:
        return json.load(f)


def resolve(folder, path):
    return path if os.path.isabs(path) else os.path.join(folder, path)


def build_trainer(job, folder=HERE, output=None, f32=False, max_steps=None):
    """The SFTTrainer of the job: base model (4-bit NF4 unless `f32`), the starting adapter, the
    pre-packed data read in order, and the settings of job.json."""
    import torch
    from datasets import load_dataset
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    base, t = job["base"], job["training"]
    output = output or os.path.join(folder, "output")
    base_path = resolve(folder, base["path"])
    cuda = torch.cuda.is_available()
    bf16 = cuda and not f32 and torch.cuda.is_bf16_supported()
    kwargs = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    quantized = base["nf4"] and not f32
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=base["double_quant"],
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t["gradient_checkpointing"])
    model = PeftModel.from_pretrained(model, resolve(folder, job["init_adapter"]), is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    files = {"train": resolve(folder, job["data"]["train"])}
    if job["data"]["validation"]:
        files["validation"] = resolve(folder, job["data"]["validation"])
    data = load_dataset("json", data_files=files)
    evaluate = "validation" in data
    # A step's rows are shared by the processes, the rest taken by accumulation: the same steps on
    # one GPU as on the number the job was exported for.
    world, rows = int(os.environ.get("WORLD_SIZE", "1")), job["data"]["rows_per_step"]
    if rows % world:
        raise SystemExit(
            f"job.json: a step is {rows} rows, which {world} processes cannot share evenly; export the job again "
            f"with --gpus {world}"
        )
    eval_steps = t["eval_steps"] if evaluate else None
    args = SFTConfig(
        output_dir=output,
        # One row is one packed micro-batch of edgetune's, its samples kept apart by their
        # position ids (padding-free); rows are read in order, never shuffled.
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=rows // world,
        padding_free=True,
        packing=False,
        max_length=None,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        max_steps=max_steps or t["max_steps"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"],
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        adam_beta1=t["adam_beta1"],
        adam_beta2=t["adam_beta2"],
        adam_epsilon=t["adam_epsilon"],
        max_grad_norm=t["max_grad_norm"],
        seed=t["seed"],
        data_seed=t["seed"],
        gradient_checkpointing=t["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=bf16,
        logging_steps=1,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if evaluate and t["keep_best"] else "no",
        save_steps=eval_steps if evaluate and t["keep_best"] else None,
        load_best_model_at_end=bool(evaluate and t["keep_best"]),
        metric_for_best_model="eval_loss" if evaluate and t["keep_best"] else None,
        report_to="none",
    )
    callbacks = []
    if evaluate and t["early_stopping_patience"]:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t["early_stopping_patience"]))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if evaluate else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # TRL casts the LoRA weights of a 4-bit model to bf16; edgetune keeps them (and AdamW's
    # moments) in f32, and so does this job: the products still run in bf16 under autocast.
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return trainer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=os.path.join(HERE, "output"), help="where the adapter and losses go")
    ap.add_argument("--f32", action="store_true", help="f32 weights and arithmetic, no 4-bit (CPU, checks)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the job's)")
    a = ap.parse_args()
    job = load_job()
    trainer = build_trainer(job, output=a.output, f32=a.f32, max_steps=a.max_steps)
    trainer.train()
    trainer.save_model(os.path.join(a.output, "adapter"))
    if trainer.is_world_process_zero():
        steps = [
            {k: h[k] for k in ("step", "loss", "learning_rate", "grad_norm") if k in h}
            for h in trainer.state.log_history
            if "loss" in h
        ]
        evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in trainer.state.log_history if "eval_loss" in h]
        with open(os.path.join(a.output, "losses.json"), "w") as f:
            json.dump({"steps": steps, "evals": evals}, f, indent=1)
        print(f"adapter: {os.path.join(a.output, 'adapter')}")


if __name__ == "__main__":
    main()
