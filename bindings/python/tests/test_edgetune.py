"""Tests of the Python package on the tiny test model (run on the GPU adapter wgpu finds:
lavapipe in CI). Run: python3 -m unittest discover -s bindings/python/tests"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# EDGETUNE_TEST_INSTALLED=1 (scripts/test.sh sets it): test the package pip installed from the
# wheel, with its bundled library; otherwise the source tree with a library from the target folder.
INSTALLED = os.environ.get("EDGETUNE_TEST_INSTALLED") == "1"
if not INSTALLED:
    sys.path.insert(0, str(REPO / "bindings" / "python"))

import edgetune  # noqa: E402
from edgetune import _native  # noqa: E402

TINY = REPO / "tests" / "reference" / "fixtures" / "tiny_llama"
DATA = REPO / "sdk" / "data" / "persona" / "train.jsonl"
CONFIG = {
    "max_steps": 6,
    "learning_rate": 0.01,
    "lr_schedule": "constant",
    "batch_tokens": 128,
    "eval_every": 3,
    "seed": 5,
    "lora": {"r": 4, "alpha": 8},
    "data": {"max_len": 128, "val_fraction": 0.2},
}
RECORDS = [
    {"messages": [{"role": "user", "content": "Where do you keep your boat?"},
                  {"role": "assistant", "content": "In the cove below the lamp."}]},
    {"instruction": "What is your favourite colour?", "output": "Lighthouse red."},
]
PROBE = "In the cove below the lamp."


class ModelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = edgetune.Model.load(TINY, max_context=256)

    @classmethod
    def tearDownClass(cls):
        cls.model.close()

    def test_version_is_the_crates(self):
        cargo = (REPO / "Cargo.toml").read_text()
        declared = re.search(r'^\[workspace\.package\]\nversion = "([^"]+)"', cargo, re.M).group(1)
        self.assertEqual(edgetune.version(), declared)

    def test_context_describes_its_adapter(self):
        with edgetune.Context() as ctx:
            about = ctx.describe()
        self.assertIn("backend", about)
        self.assertTrue(about["name"])
        self.assertTrue(ctx.closed)

    def test_streamed_pieces_make_the_generated_text(self):
        pieces = []
        text = self.model.generate("Hello", max_new_tokens=8, on_token=pieces.append)
        self.assertGreater(len(pieces), 0)
        self.assertEqual("".join(pieces), text)
        self.assertEqual("".join(self.model.stream("Hello", max_new_tokens=8)), text)

    def test_the_token_callback_can_stop_generation(self):
        pieces = []

        def first_only(piece):
            pieces.append(piece)
            return False

        self.model.generate("Hello", max_new_tokens=8, on_token=first_only)
        self.assertEqual(len(pieces), 1)
        stream = self.model.stream("Hello", max_new_tokens=8)
        self.assertIsInstance(next(stream), str)
        stream.close()  # stops the worker; must not hang

    def test_several_requests_at_once_get_what_each_gets_alone(self):
        prompts = ["Hello", "The boat", "A lamp in the"]
        alone = [self.model.generate(p, max_new_tokens=6, temperature=0.7, seed=3) for p in prompts]
        pieces = ["", "", ""]

        def collect(i, piece):
            pieces[i] += piece

        many = self.model.generate_many(prompts, max_new_tokens=6, temperature=0.7, seed=3, on_token=collect)
        self.assertEqual(many, alone)
        self.assertEqual(pieces, alone)
        # A callback returning False ends its own request only.
        stopped = self.model.generate_many(
            [(None, p) for p in prompts], max_new_tokens=6, on_token=lambda i, _p: i != 1
        )
        self.assertEqual(stopped[0], self.model.generate(prompts[0], max_new_tokens=6))
        self.assertEqual(stopped[1], self.model.generate(prompts[1], max_new_tokens=6, on_token=lambda _p: False))
        with self.assertRaises(KeyError):
            self.model.generate_many(prompts, max_new_tokens=4, on_token=lambda i, p: {}["boom"])
        # In one row each request ends, and is told with its text, before the next streams.
        events = []
        one_row = self.model.generate_many(
            prompts,
            max_new_tokens=6,
            temperature=0.7,
            seed=3,
            rows=1,
            on_token=lambda i, _p: events.append(("piece", i)),
            on_end=lambda i, text: events.append(("end", i, text)),
        )
        self.assertEqual(one_row, alone)
        ends = [e for e in events if e[0] == "end"]
        self.assertEqual(ends, [("end", i, alone[i]) for i in range(3)])
        self.assertEqual([e[1] for e in events], sorted(e[1] for e in events))
        # An exception in on_end ends the requests still going at their next piece.
        ended = []

        def boom(i, _text):
            ended.append(i)
            raise KeyError("boom")

        with self.assertRaises(KeyError):
            self.model.generate_many(prompts, max_new_tokens=4, rows=1, on_end=boom)
        self.assertEqual(ended, [0])
        with self.assertRaisesRegex(edgetune.EdgetuneError, "`rows` must be a whole number"):
            self.model.generate_many(prompts, rows=-1)
        with self.assertRaisesRegex(edgetune.EdgetuneError, "no resident adapter named `nobody`"):
            self.model.generate_many([("nobody", "Hello")])

    def test_an_exception_in_the_token_callback_is_raised(self):
        def boom(_piece):
            raise KeyError("from the callback")

        with self.assertRaises(KeyError):
            self.model.generate("Hello", max_new_tokens=8, on_token=boom)

    def test_calling_the_model_from_its_own_token_callback_is_busy_not_a_deadlock(self):
        with self.assertRaises(edgetune.BusyError) as cm:
            self.model.generate("Hello", max_new_tokens=4, on_token=lambda _piece: self.model.loss("x"))
        self.assertIn("callback", str(cm.exception))
        self.assertGreater(self.model.loss("hello there"), 0.0)  # and the model works after

    def test_closing_a_model_while_another_thread_generates_is_safe(self):
        model = edgetune.Model.load(TINY, max_context=256)
        started, closed = threading.Event(), threading.Event()
        result = {}

        def piece(_text):
            started.set()
            closed.wait(30)

        def work():
            try:
                result["text"] = model.generate("Hello", max_new_tokens=6, on_token=piece)
            except BaseException as e:  # noqa: BLE001 - checked below
                result["error"] = e

        worker = threading.Thread(target=work)
        worker.start()
        self.assertTrue(started.wait(60))
        model.close()
        closed.set()
        worker.join(60)
        self.assertFalse(worker.is_alive())
        self.assertNotIn("error", result)
        self.assertIsInstance(result["text"], str)
        with self.assertRaisesRegex(ValueError, "closed"):
            model.loss("x")

    def test_generation_options_are_checked(self):
        with self.assertRaises(edgetune.InvalidArgumentError) as cm:
            self.model.generate("Hello", top_p=2.0)
        self.assertIn("top_p", str(cm.exception))

    def test_training_cycle(self):
        base = self.model.loss(PROBE)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, out = Path(tmp) / "run.ckpt", Path(tmp) / "adapter"
            with self.model.trainer(CONFIG) as trainer:
                trainer.add_file(DATA).add_records(RECORDS)
                trainer.set_checkpoint_path(ckpt)
                events = list(trainer.events())
                trainer.save_adapter(out)
                with trainer.adapter() as trained:
                    self.model.set_adapter(trained)
                tuned = self.model.loss(PROBE)

            kinds = [e.kind for e in events]
            self.assertEqual(kinds[0], "started")
            # The settings CONFIG leaves out are chosen from the data and listed when it starts.
            self.assertIn("keep_best = false (", events[0].message)
            self.assertEqual(kinds[-1], "finished")
            self.assertEqual(events[-1].message, "completed")
            steps = [e for e in events if e.kind == "step"]
            self.assertEqual([e.step for e in steps], list(range(1, 7)))
            self.assertTrue(all(math.isfinite(e.loss) and e.lr > 0 and e.tokens_per_s > 0 for e in steps))
            self.assertTrue(all(e.total_steps == 6 for e in steps))
            self.assertLess(steps[-1].loss, steps[0].loss)
            evals = [e for e in events if e.kind == "eval"]
            self.assertEqual(len(evals), 2)
            self.assertTrue(all(e.has_val_loss for e in evals))
            self.assertIn("checkpoint", kinds)
            self.assertLess(tuned, base)

            # The PEFT folder loads back to the same adapter; None is the base model again.
            config = json.loads((out / "adapter_config.json").read_text())
            self.assertEqual(config["r"], 4)
            with self.model.load_adapter(out) as loaded:
                self.model.set_adapter(loaded)
                # As a GGUF LoRA file (f32: the same values), it loads back to the same loss.
                gguf = Path(tmp) / "adapter.gguf"
                loaded.save_gguf(gguf, self.model, type="f32")
                with self.assertRaisesRegex(edgetune.EdgetuneError, "expected f32, f16, bf16 or q8_0"):
                    loaded.save_gguf(Path(tmp) / "bad.gguf", self.model, type="q2_k")
            self.assertEqual(self.model.loss(PROBE), tuned)
            self.assertEqual(gguf.read_bytes()[:4], b"GGUF")
            # Resident by name, the adapter answers as when applied, and the base stays the base.
            question = "Where do you keep your boat?"
            with_tuned = self.model.generate(question, chat=True, max_new_tokens=6)
            self.model.set_adapter(None)
            plain = self.model.generate(question, chat=True, max_new_tokens=6)
            with self.model.load_adapter(gguf) as from_gguf:
                self.model.keep_adapter("tuned", from_gguf)
            self.assertEqual(self.model.generate(question, chat=True, max_new_tokens=6, adapter="tuned"), with_tuned)
            self.assertEqual(self.model.generate(question, chat=True, max_new_tokens=6), plain)
            with self.assertRaisesRegex(edgetune.EdgetuneError, "no resident adapter named `other`"):
                self.model.generate(question, adapter="other")
            # Both at once, each as alone.
            both = self.model.generate_many([("tuned", question), (None, question)], chat=True, max_new_tokens=6)
            self.assertEqual(both, [with_tuned, plain])
            self.model.drop_adapter("tuned")
            with self.assertRaises(edgetune.EdgetuneError):
                self.model.drop_adapter("tuned")
            with self.model.load_adapter(gguf) as from_gguf:
                self.model.set_adapter(from_gguf)
            self.assertEqual(self.model.loss(PROBE), tuned)
            # Held-out answers scored, base against adapter: each answer is generate's, and the
            # adapter's own answer as the reference is an exact match.
            held = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": with_tuned}]}]
            report = self.model.score_answers(held, max_new_tokens=6)
            answer = report["answers"][0]
            self.assertEqual(
                (answer["line"], answer["question"], answer["base"], answer["adapter"]), (1, question, plain, with_tuned)
            )
            self.assertEqual((report["adapter"]["exact"], report["adapter"]["f1"]), (1.0, 1.0))
            self.assertEqual(report["base"], answer["base_scores"])
            with self.assertRaisesRegex(edgetune.EdgetuneError, "records.*line 1.*no reference answer"):
                self.model.score_answers([{"text": "just text"}])
            self.model.set_adapter(None)
            self.assertEqual(self.model.loss(PROBE), base)

            # Resumed from its checkpoint, a new trainer has nothing left to do and gives the
            # same adapter.
            with self.model.trainer(CONFIG) as resumed:
                resumed.add_file(DATA).add_records(RECORDS)
                resumed.resume(ckpt)
                finished = resumed.run()
                self.assertEqual(finished.kind, "finished")
                with resumed.adapter() as again:
                    self.model.set_adapter(again)
            self.assertEqual(self.model.loss(PROBE), tuned)
            self.model.set_adapter(None)

    def test_dpo_on_preference_records_reports_rewards(self):
        # Preference pairs in memory, TRL's formats: an explicit prompt and an implicit one.
        pairs = [
            {"prompt": [{"role": "user", "content": "Where do you keep your boat?"}],
             "chosen": [{"role": "assistant", "content": "In the cove below the lamp."}],
             "rejected": [{"role": "assistant", "content": "I have no boat."}]},
            {"chosen": [{"role": "user", "content": "Your colour?"}, {"role": "assistant", "content": "Red."}],
             "rejected": [{"role": "user", "content": "Your colour?"}, {"role": "assistant", "content": "Blue."}]},
        ]
        config = {"method": "dpo", "dpo": {"beta": 0.1}, "max_steps": 4, "learning_rate": 0.01,
                  "lr_schedule": "constant", "batch_tokens": 128, "lora": {"r": 4, "alpha": 8}}
        with self.model.trainer(config) as trainer:
            trainer.add_records(pairs)
            events = list(trainer.events())
        self.assertIn("dpo.reference = precomputed (", events[0].message)
        steps = [e for e in events if e.kind == "step"]
        self.assertEqual(len(steps), 4)
        # The policy starts as the reference: log 2, zero rewards; then the chosen answers win.
        self.assertAlmostEqual(steps[0].loss, math.log(2), places=5)
        self.assertEqual((steps[0].reward_chosen, steps[0].reward_rejected), (0.0, 0.0))
        self.assertTrue(all(math.isfinite(e.reward_margin) for e in steps))
        self.assertGreater(steps[-1].reward_margin, 0.0)
        self.assertEqual(steps[-1].reward_accuracy, 1.0)
        # Supervised events carry no rewards; preference records under SFT are refused.
        with self.model.trainer(CONFIG) as trainer:
            trainer.add_records(pairs)
            with self.assertRaisesRegex(edgetune.EdgetuneError, 'method = "dpo"'):
                list(trainer.events())

    def test_answers_are_scored_at_each_evaluation(self):
        held_out = [{"messages": [{"role": "user", "content": "Where do you keep your boat?"},
                                  {"role": "assistant", "content": "In the cove below the lamp."}]}]
        with self.model.trainer(CONFIG) as trainer:
            trainer.add_file(DATA).add_records(RECORDS)
            with self.assertRaisesRegex(edgetune.EdgetuneError, "line 1"):
                trainer.score_answers_at_evals([{"text": "no answer here"}])
            trainer.score_answers_at_evals(held_out, max_new_tokens=6)
            events = list(trainer.events())
            final = trainer.adapter()
        evals = [e for e in events if e.kind == "eval"]
        self.assertGreater(len(evals), 0)
        self.assertTrue(all(e.answers is None for e in events if e.kind != "eval"))
        # The base's scores are the same at every evaluation; the last evaluation's adapter
        # scores are the final adapter's, as Model.score_answers gives them.
        self.assertTrue(all(e.answers_base == evals[0].answers_base for e in evals))
        self.model.set_adapter(final)
        try:
            report = self.model.score_answers(held_out, max_new_tokens=6)
        finally:
            self.model.set_adapter(None)
        self.assertEqual(evals[-1].answers_base, report["base"])
        self.assertEqual(evals[-1].answers, report["adapter"])

    def test_settings_left_out_are_chosen_from_the_data_and_repeat_the_run(self):
        with self.model.trainer({"lora": {"r": 4, "alpha": 8}, "data": {"max_len": 128}}) as trainer:
            trainer.add_file(DATA).add_records(RECORDS)
            settings = trainer.settings()
        chosen = {c["setting"]: c for c in settings["chosen"]}
        for name in ("batch_tokens", "epochs", "learning_rate", "warmup_steps", "keep_best"):
            self.assertIn(name, chosen)
            self.assertEqual(str(settings["config"][name]).lower(), chosen[name]["value"].lower()
                             if name != "learning_rate" else str(settings["config"][name]).lower())
        self.assertAlmostEqual(settings["config"]["learning_rate"], float(chosen["learning_rate"]["value"]))
        # The persona data asks each fact three ways, so answers another record restates validate.
        self.assertEqual(chosen["validation"]["value"], "restated")
        self.assertIs(settings["config"]["keep_best"], True)
        with self.model.trainer(settings["config"]) as again:
            again.add_file(DATA).add_records(RECORDS)
            repeated = again.settings()
        self.assertEqual(repeated["config"], settings["config"])
        self.assertEqual([c["setting"] for c in repeated["chosen"]], ["validation"])

    def test_cancel_from_another_thread(self):
        stepped = threading.Event()
        seen = []

        def on_event(e):
            seen.append(e)
            if e.kind == "step":
                stepped.set()

        with self.model.trainer(dict(CONFIG, max_steps=10_000)) as trainer:
            trainer.add_file(DATA)
            canceller = threading.Thread(target=lambda: (stepped.wait(60), trainer.cancel()))
            canceller.start()
            finished = trainer.run(on_event)
            canceller.join()
        self.assertEqual(finished.message, "cancelled")
        self.assertLess(finished.step, 10_000)
        self.assertEqual(seen[-1], finished)

    def test_leaving_the_event_loop_cancels_the_run(self):
        with self.model.trainer(dict(CONFIG, max_steps=10_000)) as trainer:
            trainer.add_file(DATA)
            for event in trainer.events():
                if event.kind == "step":
                    break
            # The run is over and cancelled: running again finishes at once as cancelled.
            self.assertEqual(trainer.run().message, "cancelled")

    def test_an_exception_in_the_event_callback_cancels_and_is_raised(self):
        def boom(e):
            if e.kind == "step":
                raise RuntimeError("stop here")

        with self.model.trainer(dict(CONFIG, max_steps=10_000)) as trainer:
            trainer.add_file(DATA)
            with self.assertRaisesRegex(RuntimeError, "stop here"):
                trainer.run(boom)


class ExampleTest(unittest.TestCase):
    def test_the_example_runs_as_documented(self):
        with tempfile.TemporaryDirectory() as tmp:
            # The installed package when testing the wheel; else the source tree.
            env = dict(os.environ) if INSTALLED else dict(os.environ, PYTHONPATH=str(REPO / "bindings" / "python"))
            example = REPO / "bindings" / "python" / "examples" / "personalize.py"
            run = subprocess.run(
                [sys.executable, str(example), str(TINY), str(DATA), tmp],
                env=env, capture_output=True, text=True, timeout=600,
            )
            self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
            self.assertIn("training completed", run.stdout)
            self.assertIn("step 30/30", run.stdout)
            self.assertTrue((Path(tmp) / "adapter_model.safetensors").exists())


class PackageTest(unittest.TestCase):
    """The package as installed, and its ctypes declarations against the C header."""

    HEADER = (REPO / "bindings" / "c" / "include" / "edgetune.h").read_text()

    def test_the_installed_package_carries_its_library(self):
        if not INSTALLED:
            self.skipTest("testing the source tree (EDGETUNE_TEST_INSTALLED is not 1)")
        package = Path(edgetune.__file__).resolve().parent
        self.assertNotIn(REPO.resolve(), package.parents, "imported from the clone, not the wheel")
        self.assertNotIn("EDGETUNE_LIB", os.environ)
        self.assertEqual(Path(edgetune._lib._name).resolve().parent, package)
        self.assertTrue((package / "py.typed").is_file())
        # Published as a manylinux wheel (scripts/wheel.sh: auditwheel repair): any Python 3,
        # any Linux with the policy's glibc.
        from importlib.metadata import distribution
        wheel = distribution("edgetune").read_text("WHEEL") or ""
        tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
        if sys.platform.startswith("linux"):
            self.assertTrue(tags and all(t.startswith("py3-none-manylinux") for t in tags), tags)
        else:
            self.assertTrue(tags and all(t.startswith("py3-none-") for t in tags), tags)

    def test_versions_agree(self):
        pyproject = (REPO / "bindings" / "python" / "pyproject.toml").read_text()
        self.assertIn(f'version = "{edgetune.__version__}"', pyproject)
        self.assertEqual(edgetune.version(), edgetune.__version__)
        major, minor, patch = (int(re.search(rf"EDGETUNE_VERSION_{k} (\d+)", self.HEADER).group(1))
                               for k in ("MAJOR", "MINOR", "PATCH"))
        self.assertEqual(f"{major}.{minor}.{patch}", edgetune.__version__)

    # The ctypes type each C type must be declared as.
    C_TYPES = {
        "const char *": {ctypes.c_char_p},
        "char *": {ctypes.c_char_p, ctypes.c_void_p},
        "void *": {ctypes.c_void_p},
        "size_t": {ctypes.c_size_t},
        "uint32_t": {ctypes.c_uint32},
        "uint64_t": {ctypes.c_uint64},
        "int32_t": {ctypes.c_int32},
        "float": {ctypes.c_float},
        "double": {ctypes.c_double},
        "float *": {ctypes.POINTER(ctypes.c_float)},
        "char **": {ctypes.POINTER(ctypes.c_void_p)},
        "void": {None},
        "edgetune_token_callback": {_native.TOKEN_CALLBACK},
        "edgetune_event_callback": {_native.EVENT_CALLBACK},
        "edgetune_request_callback": {_native.REQUEST_CALLBACK},
        "edgetune_request_end_callback": {_native.REQUEST_END_CALLBACK},
    }

    def expected(self, c_type: str) -> set:
        """The ctypes types a parameter, field or result of `c_type` may be declared as."""
        t = " ".join(c_type.replace("*", " * ").split()).replace("* *", "**")
        if t.startswith("enum "):
            return {ctypes.c_int, ctypes.c_int32}
        handle = re.fullmatch(r"(const )?struct edgetune_\w+ (\*\*?)", t)
        if handle:  # a handle, or an out-pointer to one
            return {ctypes.POINTER(ctypes.c_void_p)} if handle.group(2) == "**" else {ctypes.c_void_p}
        self.assertIn(t, self.C_TYPES, f"no ctypes mapping for the C type {c_type!r}")
        return self.C_TYPES[t]

    def test_every_function_is_declared_as_the_header_declares_it(self):
        pattern = r"^([a-z][\w ]*?\**)\s*\b(edgetune_\w+)\(([^)]*)\);"
        functions = {m.group(2): (m.group(1), m.group(3)) for m in re.finditer(pattern, self.HEADER, re.M)}
        self.assertEqual(sorted(functions), sorted(_native._PROTOTYPES))
        for name, (ret, args) in functions.items():
            restype, argtypes = _native._PROTOTYPES[name]
            with self.subTest(function=name):
                self.assertIn(restype, self.expected(ret), f"{name} returns {ret}")
                params = [] if args.strip() == "void" else [a.strip() for a in args.split(",")]
                self.assertEqual(len(params), len(argtypes), f"{name}({args})")
                for param, declared in zip(params, argtypes):
                    c_type = re.sub(r"\b\w+$", "", param)  # the type without the parameter's name
                    self.assertIn(declared, self.expected(c_type), f"{name}: {param}")

    def test_the_event_struct_matches_the_header(self):
        body = re.search(r"typedef struct edgetune_event \{(.*?)\} edgetune_event;", self.HEADER, re.S).group(1)
        body = re.sub(r"/\*\*.*?\*/", "", body, flags=re.S)
        fields = [re.match(r"\s*(.*?)(\w+);", f + ";").groups() for f in body.split(";") if f.strip()]
        declared = _native.Event._fields_
        self.assertEqual([n for _, n in fields], [n for n, _ in declared])
        for (c_type, name), (_, py_type) in zip(fields, declared):
            with self.subTest(field=name):
                self.assertIn(py_type, self.expected(c_type), f"{c_type}{name}")


class ErrorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = edgetune.Model.load(TINY, max_context=64)

    @classmethod
    def tearDownClass(cls):
        cls.model.close()

    def test_every_status_in_the_header_has_its_exception(self):
        header = (REPO / "bindings" / "c" / "include" / "edgetune.h").read_text()
        statuses = {int(n): name for name, n in re.findall(r"\b(EDGETUNE_ERROR_[A-Z_]+) = (\d+)", header)}
        self.assertIn("EDGETUNE_ERROR_OUT_OF_MEMORY", statuses.values())
        self.assertEqual(sorted(statuses), sorted(edgetune._ERRORS))
        for n, name in statuses.items():
            self.assertEqual(edgetune._ERRORS[n].status, name)
        self.assertTrue(issubclass(edgetune.OutOfGpuMemoryError, MemoryError))

    def test_an_unknown_setting_is_named(self):
        with self.assertRaises(edgetune.InvalidArgumentError) as cm:
            self.model.trainer({"learning_rat": 1e-3})
        self.assertIn("learning_rat", cm.exception.message)
        self.assertEqual(cm.exception.status, "EDGETUNE_ERROR_INVALID_ARGUMENT")

    def test_bad_json_is_an_error(self):
        with self.assertRaises(edgetune.InvalidArgumentError):
            self.model.trainer("{not json")

    def test_a_missing_file_is_named(self):
        with self.model.trainer(CONFIG) as trainer:
            with self.assertRaises(edgetune.EdgetuneError) as cm:
                trainer.add_file("/nonexistent/data.jsonl")
        self.assertIn("/nonexistent/data.jsonl", str(cm.exception))

    def test_a_bad_record_is_named_when_training_starts(self):
        with self.model.trainer(CONFIG) as trainer:
            trainer.add_file(DATA).add_record(RECORDS[0]).add_record({"neither": "shape"})
            with self.assertRaises(edgetune.FormatError) as cm:
                trainer.run()
        self.assertIn("records: line 2", str(cm.exception))
        self.assertIn("neither", str(cm.exception))

    def test_a_missing_model_is_named(self):
        with self.assertRaises(edgetune.EdgetuneError) as cm:
            edgetune.Model.load("/nonexistent/model.gguf")
        self.assertIn("/nonexistent/model.gguf", str(cm.exception))

    def test_an_unknown_quant_is_refused(self):
        with self.assertRaises(edgetune.InvalidArgumentError):
            edgetune.Model.load(TINY, quant="q3")

    def test_every_quant_in_the_header_has_its_name_and_loads_a_gguf_file(self):
        header = (REPO / "bindings" / "c" / "include" / "edgetune.h").read_text()
        quants = {name.lower(): int(n) for name, n in re.findall(r"\bEDGETUNE_QUANT_([A-Z0-9]+) = (\d+)", header)}
        self.assertEqual(quants, edgetune._QUANTS)
        gguf = REPO / "tests" / "reference" / "fixtures" / "tiny_llama_spm.gguf"
        for quant in quants:
            with self.subTest(quant=quant), edgetune.Model.load(gguf, quant=quant, max_context=64) as model:
                self.assertTrue(model.generate("Paris", max_new_tokens=2))

    def test_a_missing_adapter_folder_is_named(self):
        with self.assertRaises(edgetune.EdgetuneError) as cm:
            self.model.load_adapter("/nonexistent/adapter")
        self.assertIn("/nonexistent/adapter", str(cm.exception))

    def test_the_adapter_before_training_is_an_error(self):
        with self.model.trainer(CONFIG) as trainer:
            with self.assertRaises(edgetune.EdgetuneError):
                trainer.adapter()

    def test_a_missing_library_names_where_it_looked(self):
        from edgetune import _native

        saved = _native.os.environ.get("EDGETUNE_LIB")
        _native.os.environ["EDGETUNE_LIB"] = "/nonexistent/libedgetune.so"
        try:
            with self.assertRaisesRegex(OSError, "(?s)/nonexistent/libedgetune.so.*cargo build --release -p edgetune-capi"):
                _native.load_library()
        finally:
            if saved is None:
                del _native.os.environ["EDGETUNE_LIB"]
            else:
                _native.os.environ["EDGETUNE_LIB"] = saved

    def test_a_closed_handle_is_refused_without_reaching_the_library(self):
        trainer = self.model.trainer(CONFIG)
        trainer.close()
        trainer.close()  # closing twice is fine
        with self.assertRaisesRegex(ValueError, "closed"):
            trainer.add_file(DATA)


if __name__ == "__main__":
    unittest.main()
