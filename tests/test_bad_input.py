"""Every bad input is one line on stderr, a non-zero exit, no traceback, nothing damaged."""
import shutil

import pytest

from conftest import ROOT, cli, one_line_error

CI = ROOT / "configs" / "ci.toml"
SMOL = ROOT / "quantized" / "smollm2-135m.toml"


def assert_one_line_error(r, *fragments):
    assert one_line_error(r, 2, *fragments).startswith("error: ")


def config(tmp_path, text):
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def base_config(**lines):
    body = {"generator": f'"{SMOL}"', "extra": f'["{ROOT}/quantized/gemma3-270m.toml", "{ROOT}/quantized/smollm2-135m-hf-nf4.toml"]'}
    body.update(lines)
    return "".join(f"{k} = {v}\n" for k, v in body.items())


@pytest.mark.parametrize("content,fragment", [
    (None, "seed file not found"),
    ("", "no seed tasks (empty file)"),
    ('{"instruction": "x", "instances": [{"input": "", "output": "y"}]}\nnot json\n', "seeds.jsonl:2: not valid JSON"),
    ('{"instances": [{"input": "", "output": "y"}]}\n', "seeds.jsonl:1: missing or empty 'instruction'"),
    ('{"instruction": "x"}\n', "seeds.jsonl:1: missing or empty 'instances'"),
])
def test_bad_seed_file(tmp_path, content, fragment):
    seeds = tmp_path / "seeds.jsonl"
    if content is not None:
        seeds.write_text(content)
    cfg = config(tmp_path, base_config(seeds_file=f'"{seeds}"'))
    assert_one_line_error(cli("generate", "-c", cfg, "--out", tmp_path / "run"), fragment)


@pytest.mark.parametrize("extra_line,fragment", [
    ("colour = 3", "colour: unknown key"),
    ("seed = \"forty\"", "seed: Input should be a valid integer"),
    ("[ensemble]\nthreshold = 2.0", "ensemble.threshold: Input should be less than 1"),
    ("[instructions]\ntarget = { A = 1 }", "instructions.target.B: Field required"),
])
def test_bad_config(tmp_path, extra_line, fragment):
    cfg = config(tmp_path, base_config() + extra_line + "\n")
    assert_one_line_error(cli("generate", "-c", cfg, "--out", tmp_path / "run"), "config.toml", fragment)


def test_config_not_found_and_not_toml(tmp_path):
    assert_one_line_error(cli("generate", "-c", tmp_path / "nope.toml"), "config file not found")
    cfg = config(tmp_path, "this is = = not toml")
    assert_one_line_error(cli("generate", "-c", cfg), "invalid TOML")


@pytest.mark.parametrize("card,fragment", [
    ('name = "x"\nbackend = "vllm"\n[source]\npath = "a.gguf"\n', "backend: Input should be 'llama_cpp', 'transformers' or 'openai' (got 'vllm')"),
    ('name = "x"\nbackend = "llama_cpp"\nsize = 3\n[source]\npath = "a.gguf"\n', "size: unknown key"),
    ('name = "x"\nbackend = "llama_cpp"\ncontext = "big"\n[source]\npath = "a.gguf"\n', "context: Input should be a valid integer"),
    ('name = "x"\nbackend = "llama_cpp"\n', "a llama_cpp card needs a [source] table"),
])
def test_bad_model_card(tmp_path, card, fragment):
    (tmp_path / "card.toml").write_text(card)
    cfg = config(tmp_path, base_config(generator=f'"{tmp_path / "card.toml"}"'))
    assert_one_line_error(cli("generate", "-c", cfg, "--out", tmp_path / "run"), "card.toml", fragment)


@pytest.mark.models
def test_missing_and_non_gguf_model_file(tmp_path):
    (tmp_path / "card.toml").write_text('name = "x"\nbackend = "llama_cpp"\n[source]\npath = "model.gguf"\n')
    cfg = config(tmp_path, base_config(generator=f'"{tmp_path / "card.toml"}"'))
    assert_one_line_error(cli("generate", "-c", cfg, "--out", tmp_path / "run"), "model file not found", "model.gguf")
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model")
    assert_one_line_error(cli("generate", "-c", cfg, "--out", tmp_path / "run2"), "model.gguf: not a GGUF file")


def test_missing_optional_dependency_names_the_extra(tmp_path):
    hide = ("import importlib.util as u\n_real = u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n == 'llama_cpp' else _real(n, *a)")
    r = cli("generate", "-c", CI, "--out", tmp_path / "run", wrapper=hide)
    assert_one_line_error(r, "backend llama_cpp needs the package 'llama_cpp'", "pip install -e '.[llama]'")
    assert not (tmp_path / "run").exists()  # checked before anything is created


def test_run_directory_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(cli("generate", "-c", CI, "--out", blocker / "run"), "run directory is not writable")


# During the first write to one stage file, the kernel lets no file grow past `limit` bytes
# (RLIMIT_FSIZE, as a full disk would); the write lands in part, then fails. Only during that write:
# the manifest, written first and larger than every stage file, would otherwise take the failure
# before any stage (and on the way out, the stage's timings written to it would replace the error).
DISK_FULL_AT = """import resource
from pathlib import Path
from ensemble_instruct import store
_append, _writes = store.append_jsonl, []
def append(path, records):
    if Path(path).name != {name!r} or _writes:
        return _append(path, records)
    _writes.append(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, hard))
    try:
        return _append(path, records)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
store.append_jsonl = append"""


@pytest.mark.models
def test_write_failure_mid_run_then_resume(reference_run, tmp_path):
    """The disk fills up in the middle of a stage (instances, after the instructions): one error
    line, exit 2; the resume drops the torn record and makes what an uninterrupted run makes."""
    out, name = tmp_path / "run", "instances_A.jsonl"
    full = (reference_run / name).read_bytes()
    first = full.index(b"\n") + 1  # the stage writes its records in one batch: the first fits whole
    r = cli("generate", "-c", CI, "--out", out, wrapper=DISK_FULL_AT.format(name=name, limit=first + 20))
    assert r.returncode == 2 and "Traceback" not in r.stderr  # progress lines come first, the error last
    assert r.stderr.strip().splitlines()[-1] == f"error: {out / name}: cannot write: File too large"
    # it landed inside the stage: the stage before it is whole, this one started and did not finish
    assert (out / "instructions_A.jsonl").read_bytes() == (reference_run / "instructions_A.jsonl").read_bytes()
    assert (out / name).read_bytes() == full[:first + 20]  # a torn batch, cut by the kernel
    assert not (out / "dataset.jsonl").exists()
    r = cli("generate", "-c", CI, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in sorted(reference_run.glob("*.jsonl")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.models
def test_stage_file_edited_into_invalid_json(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    path = run / "instances_A.jsonl"
    rows = path.read_text().splitlines()
    rows[0] = rows[0][:-5]  # a hand edit that breaks the first line
    path.write_text("\n".join(rows) + "\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert_one_line_error(cli("generate", "--out", run), "instances_A.jsonl:1: not valid JSON")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing was touched
    manifest = run / "manifest.json"
    manifest.write_text("{oops")
    assert_one_line_error(cli("generate", "--out", run), "manifest.json: not valid JSON")


@pytest.mark.models
def test_bitsandbytes_that_cannot_run_here(tmp_path):
    # bitsandbytes present but unusable (as on a machine its build does not support)
    broken = "sys.modules['bitsandbytes'] = None  # import bitsandbytes now raises ImportError"
    r = cli("models", "check", "smollm2-135m-hf-nf4", wrapper=broken)
    assert_one_line_error(r, "nf4 needs bitsandbytes, which cannot be loaded here")


@pytest.mark.models
def test_stage_commands_one_by_one_equal_generate(reference_run, tmp_path):
    run = tmp_path / "run"
    r = cli("instances", "-c", CI, "--out", run)
    assert_one_line_error(r, "instruction generation is not finished")
    steps = [("instructions",), ("instances",), ("outputs", "--model", "gemma3-270m"),
             ("outputs", "--model", "quantized/smollm2-135m-hf-nf4.toml")]
    for step in steps:
        r = cli(*step, "-c", CI, "--out", run)
        assert r.returncode == 0, (step, r.stderr[-2000:])
    assert_one_line_error(cli("outputs", "--model", "smollm2-135m", "--out", run), "not an extra model of this run")
    r = cli("ensemble", "--run", run)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in sorted(reference_run.glob("*.jsonl")):
        assert (run / f.name).read_bytes() == f.read_bytes(), f.name
