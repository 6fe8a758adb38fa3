"""Card settings resolved once (settings.py): "auto" numbers come from the plan when a directory is
first opened, are recorded, and are reused on resume whatever memory is free then; a backend refuses
a card that still says "auto". No weights needed: a hub card carries the shape the plan reads."""
import json

import pytest

from conftest import ROOT, cli
from ensemble_instruct import plan as P, settings
from ensemble_instruct.backends import load_backend
from ensemble_instruct.config import load_card

CARD = ROOT / "quantized" / "qwen2.5-32b-instruct-q4_k_m.toml"


def auto_card(**update):
    card, path = load_card(CARD)
    return card.model_copy(update={"gpu_layers": "auto", "parallel": "auto", **update}), path


def test_first_open_plans_and_records_then_a_resume_keeps_the_numbers(monkeypatch):
    monkeypatch.setattr(P.probe, "detect_budget", lambda *a: P.Budget(12 * P.GIB, None, "GPU, 12 GB"))
    (card, path), (fixed, fixed_path) = auto_card(), load_card(ROOT / "quantized" / "smollm2-135m.toml")
    pairs, record = settings.resolve([(card, path), (fixed, fixed_path)], ["generator", "extra1"],
                                     ["generator", "extra"], None, {})
    got = pairs[0][0]
    assert isinstance(got.gpu_layers, int) and isinstance(got.parallel, int)
    assert pairs[1][0] is fixed and list(record) == ["generator"]  # a card without "auto" is left alone
    assert record["generator"] == {"gpu_layers": got.gpu_layers, "parallel": got.parallel, "budget": "GPU, 12 GB",
                                   "card": {"gpu_layers": "auto", "parallel": "auto"}}
    # the resume sees another GPU: the recorded numbers win, and the plan is not asked
    monkeypatch.setattr(P.probe, "detect_budget", lambda *a: pytest.fail("planned again on resume"))
    again, record2 = settings.resolve([(card, path)], ["generator"], ["generator"], None, record)
    assert again[0][0] == got and record2 == record


def test_a_setting_that_became_auto_since_the_record_is_planned(monkeypatch):
    monkeypatch.setattr(P.probe, "detect_budget", lambda *a: P.Budget(12 * P.GIB, None, "GPU, 12 GB"))
    card, path = auto_card()
    recorded = {"m": {"gpu_layers": 10, "parallel": None, "budget": "old", "card": {"gpu_layers": "auto", "parallel": 4}}}
    pairs, record = settings.resolve([(card, path)], ["m"], ["extra"], None, recorded)
    assert isinstance(pairs[0][0].parallel, int) and record["m"]["budget"] == "GPU, 12 GB"


def test_a_backend_refuses_an_unresolved_auto():
    card, path = auto_card()
    with pytest.raises(ValueError, match="must be resolved before loading"):
        load_backend(card, path)


@pytest.mark.models
def test_models_check_resolves_auto_as_runs_do(tmp_path):
    """`models check` of an "auto" card holds what settings.resolve picks for the card's worst case
    and the memory free now (here: no GPU, 0.35 GB of RAM), not a number of its own."""
    base, _ = load_card(ROOT / "quantized" / "smollm2-135m.toml")
    card_file = tmp_path / "auto.toml"
    card_file.write_text(f'name = "smollm2-auto"\nbackend = "llama_cpp"\ngpu_layers = "auto"\nparallel = "auto"\n'
                         f'context = 1024\n[source]\npackage = "{base.source.package}"\nfile = "{base.source.file}"\n')
    card, path = load_card(card_file)
    want = P.resolve_auto(card, path, "check", None, P.Budget(None, 0.35 * P.GIB, "test"))[0].parallel
    assert 1 < want < P.MAX_PARALLEL  # the budget decides: neither end of the range
    r = cli("models", "check", card_file, "--json", script="tests/inject.py",
            env={"INJECT_RAM_GB": "0.35", "ENSEMBLE_INSTRUCT_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["parallel"] == want
