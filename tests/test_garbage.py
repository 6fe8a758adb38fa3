"""A model that returns garbage is counted and filtered, never a crash (control flow: fake models)."""
import fakes
from conftest import read_jsonl
from ensemble_instruct import rundir
from ensemble_instruct.backends import Completion
from ensemble_instruct.report import funnel
from ensemble_instruct.stages import ensemble, instances, instructions, outputs

GARBAGE = ["", "   ", "the same words " * 200, "bytes \ufffd\ufffd that were not UTF-8",
           "|EoS||EoS|", "\n\n\n", "1.\n2.\n3.", "Write a program to do it all |EoS|", "ok " * 400]


class GarbageModel(fakes.FakeBackend):
    """Answers each prompt with the next of GARBAGE, whatever the prompt and the seed."""

    def __init__(self, card):
        super().__init__(card, window=3)
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


VALID = ["Rewrite the following sentence as a polite question.", "Translate this English text into formal German.",
         "Classify the sentiment of the product review below.", "Name three famous painters of the Renaissance period.",
         "Explain why the sky looks blue during the day.", "Suggest a healthy dinner for a family of four."]


class Generator(GarbageModel):
    """Valid, distinct instructions; then a usable instance for some of them and garbage for the
    others (a looping output for the 4th type-A instruction, nothing for the 2nd type-B one)."""

    def generate(self, prompts, params, seeds, prefix=None):
        out = []
        for p in prompts:
            if p.rstrip().endswith((":",)):  # an instance prompt: ends with "input:" or "output:"
                instruction = p.rsplit("instruction: ", 1)[1].split("\n")[0]
                k = VALID.index(instruction)
                if k in (3, 5):
                    text = f" some input\noutput: {GARBAGE[2]}" if k == 3 else ""
                elif p.endswith("input:"):
                    text = f" some input {k}\noutput: {fakes.answer_for(instruction)}\n|EoS|"
                else:
                    text = f" {fakes.answer_for(instruction)}\n|EoS|"
            else:
                text = f" {VALID[self.n]} |EoS|"
                self.n += 1
            out.append(Completion(text, 10, 5, "stop"))
        return out


class Agrees(GarbageModel):
    """Gives the generator's answer, except to one instruction."""

    def generate(self, prompts, params, seeds, prefix=None):
        return [Completion("something else entirely" if p.startswith(VALID[2]) else fakes.answer_for(p.split("\n")[0]),
                           10, 3, "stop") for p in prompts]


def test_garbage_everywhere_is_counted_not_fatal(tmp_path, monkeypatch):
    fakes.install(monkeypatch)
    run = rundir.open_run(fakes.fake_setup(tmp_path), tmp_path / "run")
    gen = GarbageModel(run.generator[0])
    for typ in rundir.TYPES:
        instructions.run_stage(run, gen, typ)  # nothing usable: stops at max requests
    f = funnel(run.dir)
    assert f["A"]["accepted_instructions"] == 0 and f["A"]["requests"] == run.cfg.instructions.target.A * run.cfg.instructions.max_requests_factor
    assert f["A"]["instruction_rejected"]  # the reasons are counted


def test_garbage_instances_and_outputs_reach_the_ensemble(tmp_path, monkeypatch):
    fakes.install(monkeypatch)
    run = rundir.open_run(fakes.fake_setup(tmp_path, target=(4, 2)), tmp_path / "run")
    gen = Generator(run.generator[0])
    for typ in rundir.TYPES:
        instructions.run_stage(run, gen, typ)
        instances.run_stage(run, gen, typ)
    garbage, agrees = GarbageModel(run.extras[0][0]), Agrees(run.extras[1][0])
    for typ in rundir.TYPES:
        outputs.run_stage(run, garbage, typ)
        outputs.run_stage(run, agrees, typ)
    ensemble.run_stage(run)
    f = funnel(run.dir)
    assert f["A"]["accepted_instructions"] == 4 and f["B"]["accepted_instructions"] == 2
    assert f["A"]["instance_dropped"] == {"repetitive": 1} and f["B"]["instance_dropped"] == {"empty_output": 1}
    assert f["A"]["usable_instances"] == 3 and f["B"]["usable_instances"] == 1
    # every garbage extra output is recorded with why it can never be kept
    reasons = [r["reason"] for t in "AB" for r in read_jsonl(run.dir / f"outputs_extra1_{t}.jsonl")]
    assert reasons == ["empty_output", "empty_output", "repetitive", "invalid_text"]
    # the garbage model's outputs count as empty: agreement of the other two decides
    ens = {r["instruction"]: r for t in "AB" for r in read_jsonl(run.dir / f"ensemble_{t}.jsonl")}
    assert set(ens) == {VALID[0], VALID[1], VALID[2], VALID[4]}
    assert not ens[VALID[2]]["kept"] and ens[VALID[2]]["rule"] == "below_threshold"
    dataset = read_jsonl(run.dir / "dataset.jsonl")
    assert [(r["instruction"], r["output"], r["rule"], r["agreeing"]) for r in dataset] == [
        (VALID[k], fakes.answer_for(VALID[k]), "exact", ["gen", "extra2"]) for k in (0, 1, 4)]
