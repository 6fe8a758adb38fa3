"""A model that returns garbage is counted and filtered, never a crash (control flow: a fake model)."""
import json

from conftest import ROOT
from ensemble_instruct import rundir
from ensemble_instruct.stages import ensemble, instances, instructions, outputs
from ensemble_instruct.backends import Completion
from ensemble_instruct.report import funnel

GARBAGE = ["", "   ", "the same words " * 200, "bytes \ufffd\ufffd that were not UTF-8",
           "|EoS||EoS|", "\n\n\n", "1.\n2.\n3.", "Write a program to do it all |EoS|", "ok " * 400]


class GarbageModel:
    batch_size = 3

    def __init__(self, card):
        self.card = card
        self.n = 0

    def count_tokens(self, text):
        return len(text) // 4

    def generate(self, prompts, params, seeds, prefix=None):
        out = []
        for _ in prompts:
            text = GARBAGE[self.n % len(GARBAGE)]
            self.n += 1
            out.append(Completion(text, 10, len(text.split()), "length" if len(text) > 500 else "stop"))
        return out

    def close(self):
        pass


VALID = ["Rewrite the following sentence as a polite question.", "Translate this English text into formal German.",
         "Classify the sentiment of the product review below.", "Name three famous painters of the Renaissance period.",
         "Explain why the sky looks blue during the day.", "Suggest a healthy dinner for a family of four."]


class EchoThenGarbage(GarbageModel):
    """Valid, distinct instructions (so later stages get work), then garbage for everything else."""

    def generate(self, prompts, params, seeds, prefix=None):
        if "instruction:" in prompts[0]:
            return super().generate(prompts, params, seeds)
        self.n += len(prompts)
        return [Completion(f" {VALID[(self.n - len(prompts) + i) % len(VALID)]} ", 10, 9, "stop") for i in range(len(prompts))]


def test_garbage_everywhere_is_counted_not_fatal(tmp_path):
    run = rundir.open_run(ROOT / "configs" / "ci.toml", tmp_path / "run")
    gen = GarbageModel(run.generator[0])
    for typ in rundir.TYPES:
        instructions.run_stage(run, gen, typ)  # nothing usable: stops at max requests
    f = funnel(run.dir)
    assert f["A"]["accepted_instructions"] == 0 and f["A"]["requests"] == run.cfg.instructions.target.A * run.cfg.instructions.max_requests_factor
    assert f["A"]["instruction_rejected"]  # the reasons are counted


def test_garbage_instances_and_outputs(tmp_path):
    run = rundir.open_run(ROOT / "configs" / "ci.toml", tmp_path / "run")
    gen = EchoThenGarbage(run.generator[0])
    for typ in rundir.TYPES:
        instructions.run_stage(run, gen, typ)
        instances.run_stage(run, gen, typ)
    for card, _ in run.extras:
        for typ in rundir.TYPES:
            outputs.run_stage(run, GarbageModel(card), typ)
    ensemble.run_stage(run)
    f = funnel(run.dir)
    assert f["A"]["accepted_instructions"] == 3 and f["B"]["accepted_instructions"] == 2
    dropped = {**f["A"]["instance_dropped"], **f["B"]["instance_dropped"]}
    assert set(dropped) <= {"empty_output", "no_output_field", "invalid_text", "repetitive", "empty_input", "token_limit", "echo"}
    assert sum(dropped.values()) + f["A"]["usable_instances"] + f["B"]["usable_instances"] == 5
    dataset = [json.loads(l) for l in (run.dir / "dataset.jsonl").read_text().splitlines()]
    assert all(r["output"].strip() for r in dataset)
