"""config.py in process: every bundled preset and card loads; presets are found by name or path;
a bad key or value is a one-line UserError naming the file and the key (tests/test_bad_input.py
checks the same through the CLI); relative paths resolve against the config's folder."""
from pathlib import Path

import pytest

import fakes
from conftest import ROOT
from ensemble_instruct import config as C
from ensemble_instruct.config import find_config, load_card, load_config
from ensemble_instruct.errors import UserError
from test_rundir import cli, manifest

PRESETS = sorted((ROOT / "configs").glob("*.toml"))
CARDS = sorted((ROOT / "quantized").glob("*.toml"))
BASE = ('generator = "quantized/smollm2-135m.toml"\n'
        'extra = ["quantized/gemma3-270m.toml", "quantized/smollm2-135m-hf-nf4.toml"]\n')
CARD = 'name = "x"\nbackend = "llama_cpp"\n'


def refused(load, path, text) -> str:
    """load(path) of a file holding text raises a one-line UserError that starts with the path."""
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg[len(f"{path}: "):]


# ------------------------------------------------------------ what is bundled loads

def test_there_are_presets_and_cards():
    assert {p.stem for p in PRESETS} >= {"default", "ci", "paper", "consumer-24gb"} and len(CARDS) >= 10


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_with_its_cards(path):
    cfg = load_config(path)
    assert cfg._dir == path.parent.resolve()
    for card in (cfg.generator, *cfg.extra):
        assert cfg.path(card).is_file(), card
        load_card(cfg.path(card))
    assert cfg.path(cfg.seeds_file).is_file() and cfg.path(cfg.templates_dir).is_dir()


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_every_bundled_card_loads(path):
    card, found = load_card(path)
    assert found == path and card.name


# ------------------------------------------------------------ finding a config, finding a card

def test_config_by_preset_name(tmp_path):
    assert find_config("paper") == ROOT / "configs" / "paper.toml"
    assert find_config(ROOT / "configs" / "ci.toml") == ROOT / "configs" / "ci.toml"
    with pytest.raises(UserError, match=r"nope: config file not found \(a path, or a preset: ci, ci-server, "):
        find_config("nope")
    with pytest.raises(UserError, match="config file not found"):
        find_config(tmp_path / "paper")  # a path is never a preset name


def test_config_by_relative_path_and_a_file_before_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.toml").write_text(BASE)
    assert find_config("sub/mine.toml") == Path("sub/mine.toml")  # as given: relative to the cwd
    assert load_config(find_config("sub/mine.toml"))._dir == (tmp_path / "sub").resolve()
    (tmp_path / "paper").write_text(BASE)  # a file of that name, here: it wins over the preset
    assert find_config("paper") == Path("paper")
    with pytest.raises(UserError, match="sub/paper: config file not found"):
        find_config("sub/paper")  # a name with a separator is a path only


def test_card_by_name_by_path_and_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names resolve against the bundled files, not the cwd
    want = ROOT / "quantized" / "smollm2-135m.toml"
    for given in ("smollm2-135m", "quantized/smollm2-135m.toml", want):
        card, path = load_card(given)
        assert path == want and card.name == "smollm2-135m", given
    with pytest.raises(UserError, match=r"^no-such-card: model card not found \(a path, or a name listed by"):
        load_card("no-such-card")


# ------------------------------------------------------------ a bad key or value: one line, file and key

@pytest.mark.parametrize("extra,message", [
    ("[instances]\ncolour = 1", "instances.colour: unknown key"),
    ('[ensemble]\nrule = "best"', "ensemble.rule: Input should be 'paper', 'weighted', 'weighted-f1', "
                                  "'weighted-chrf' or 'quorum' (got 'best')"),
    ("[instructions]\ntop_p = 0", "instructions.top_p: Input should be greater than 0"),
    ('[finetune]\nrank = "x"', "finetune.rank: Input should be a valid integer"),
    ('[instances]\ndemos = "random"', "instances.demos: expected 'fixed' or a table (got 'random')"),
    ("[instances]\ndemos = { A = -1, B = 2 }", "instances.demos.A: Input should be greater than or equal to 0"),
    ("[outputs]\nstop = 3", "outputs.stop: Input should be a valid list"),
])
def test_bad_config_key_is_one_line_naming_file_and_key(tmp_path, extra, message):
    assert refused(load_config, tmp_path / "c.toml", BASE + extra + "\n").startswith(message)


def test_config_without_its_models_and_bad_files(tmp_path):
    assert refused(load_config, tmp_path / "c.toml", 'extra = ["a", "b"]\n') == "generator: Field required"
    assert refused(load_config, tmp_path / "c.toml", 'generator = "g"\nextra = ["a"]\n').startswith(
        "extra: List should have at least 2 items")
    assert refused(load_config, tmp_path / "c.toml", "seed = = 1\n").startswith("invalid TOML (")
    with pytest.raises(UserError, match=r"nope.toml: not found$"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("lines,message", [
    ("gpu_layers = -2", "gpu_layers: expected a number >= -1 or 'auto' (got -2)"),
    ('gpu_layers = "all"', "gpu_layers: expected an integer or 'auto' (got 'all')"),
    ("parallel = 0", "parallel: expected a number >= 1 or 'auto' (got 0)"),
    ('kv = "paged"', "kv: Input should be 'auto', 'split' or 'unified' (got 'paged')"),
    ("colour = 1", "colour: unknown key"),
    ('[source]\npath = "a.gguf"\npackage = "p"', "source: Value error, set exactly one of source.path, "),
    ('[source]\npackage = "p"', "source: Value error, source.package needs source.file"),
    ('[source]\npath = "a.gguf"\n[shape]\nn_layers = 0', "shape.n_layers: Input should be greater than or equal to 1"),
])
def test_bad_card_key_is_one_line_naming_file_and_key(tmp_path, lines, message):
    text = CARD + lines + ("\n" if "[source]" in lines else '\n[source]\npath = "a.gguf"\n')
    assert refused(load_card, tmp_path / "card.toml", text).startswith(message)


@pytest.mark.parametrize("backend,key,line", [
    ("openai", "gpu_layers", "gpu_layers = 10"),
    ("openai", "parallel", "parallel = 4"),
    ("transformers", "parallel", "parallel = 4"),
    ("transformers", "threads", "threads = 2"),
    ("llama_cpp", "batch_size", "batch_size = 8"),
    ("llama_cpp", "concurrency", "concurrency = 8"),
])
def test_card_key_of_another_backend_is_refused(tmp_path, backend, key, line):
    body = {"openai": 'base_url = "http://x"\nmodel = "m"\n',
            "transformers": "", "llama_cpp": ""}[backend]
    source = "" if backend == "openai" else '[source]\npath = "w.gguf"\n'
    card = tmp_path / "card.toml"
    card.write_text(f'name = "x"\nbackend = "{backend}"\n{body}{line}\n{source}')
    with pytest.raises(UserError) as e:
        load_card(card)
    assert str(e.value).startswith(f"{card}: {key}: not a setting of {backend} cards")


def test_hub_cards_need_a_revision(tmp_path):
    card = tmp_path / "card.toml"
    card.write_text('name = "x"\nbackend = "transformers"\n[source]\nhub_repo = "org/model"\n')
    with pytest.raises(UserError, match="source.hub_repo needs source.revision"):
        load_card(card)
    card.write_text(card.read_text() + 'revision = "0123abc"\n')
    assert load_card(card)[0].source.revision == "0123abc"


# ------------------------------------------------------------ paths in a config

def test_config_path_rules(tmp_path, monkeypatch):
    """Absolute stays; ~ expands; relative: the config's folder if the file is there, else the
    bundled file of that name, else the config's folder (so an error names where it was looked for)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "mine.toml").write_text(CARD)
    (tmp_path / "quantized").mkdir()
    (tmp_path / "quantized" / "smollm2-135m.toml").write_text(CARD)  # shadows the bundled card
    (tmp_path / "c.toml").write_text(BASE)
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.path("cards/mine.toml") == tmp_path / "cards" / "mine.toml"
    assert cfg.path("quantized/smollm2-135m.toml") == tmp_path / "quantized" / "smollm2-135m.toml"
    assert cfg.path("quantized/gemma3-270m.toml") == C.ROOT / "quantized" / "gemma3-270m.toml"
    assert cfg.path("seeds/seed_tasks.jsonl") == C.ROOT / "seeds" / "seed_tasks.jsonl"
    assert cfg.path("cards/missing.toml") == tmp_path / "cards" / "missing.toml"
    assert cfg.path("/abs/x.toml") == Path("/abs/x.toml")
    assert cfg.path("~/x.toml") == tmp_path / "home" / "x.toml"
    assert cfg.located(None).path("cards/mine.toml") == C.ROOT / "cards" / "mine.toml"  # no folder: bundled


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = fakes.fake_setup(tmp_path / "project")  # generator = "cards/gen.toml", next to the config
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cli("generate", "-c", cfg, "--out", "run", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    m = manifest(elsewhere / "run")
    assert [c["name"] for c in m["fingerprint"]["cards"]] == ["gen", "extra1", "extra2"]
    assert len(m["fingerprint"]["templates"]) == 8  # the bundled templates: none next to the config
    # resumes from elsewhere too: the manifest knows the config's folder
    r = cli("generate", "--out", elsewhere / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
