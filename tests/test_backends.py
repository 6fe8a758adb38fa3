"""Backends on real weights: the tiny GGUFs from PyPI and a tiny T5 built here."""
import pytest

from conftest import ROOT, cli
from ensemble_instruct.backends import Decoding, load_backend, stop_at, trim_at_stop
from ensemble_instruct.config import ModelCard, load_card
from ensemble_instruct.errors import UserError

pytestmark = pytest.mark.models
PROMPT = "1. Write a poem about the sea. |EoS|\n2. List three fruits that are red. |EoS|\n3."


def _loaded(card_name):
    card, path = load_card(card_name)
    b = load_backend(card, path)
    yield b
    b.close()


@pytest.fixture(scope="module")
def smollm():
    yield from _loaded("quantized/smollm2-135m.toml")


def test_trim_at_stop():
    assert trim_at_stop("abc |EoS| def", ("|EoS|",)) == "abc "
    assert trim_at_stop("abc", ("|EoS|", "\n")) == "abc"
    assert trim_at_stop("a\nb|EoS|", ("|EoS|", "\n")) == "a"
    # a model that opens its answer with blank lines has not finished it
    assert trim_at_stop("\n\nParis.\n\nMore", ("\n\n",)) == "\n\nParis."
    assert stop_at(b"  x|EoS|", (b"|EoS|",)) == 3


def test_llamacpp_seeds_are_reproducible_and_stop_is_trimmed(smollm):
    p = Decoding(max_tokens=48, temperature=0.7, top_k=50, top_p=1.0, stop=("|EoS|",))
    a = smollm.generate([PROMPT, PROMPT], p, [1, 2])
    b = smollm.generate([PROMPT, PROMPT], p, [1, 2])
    assert [c.text for c in a] == [c.text for c in b]
    assert all("|EoS|" not in c.text for c in a)
    assert all(c.prompt_tokens > 10 and 0 < c.completion_tokens <= 48 for c in a)
    g1 = smollm.generate([PROMPT], Decoding(max_tokens=24), [5])[0].text
    g2 = smollm.generate([PROMPT], Decoding(max_tokens=24), [6])[0].text
    assert g1 == g2  # greedy ignores the seed


def test_llamacpp_prompt_longer_than_context(smollm):
    """A prompt with no room to generate is that request's finish reason; the batch goes on."""
    out = smollm.generate(["word " * 9000, PROMPT], Decoding(max_tokens=8), [0, 0])
    assert (out[0].text, out[0].finish) == ("", "prompt_too_long")
    assert out[1].finish in ("length", "stop", "eos") and out[1].text


def test_gemma_assembles_from_its_packages():
    card, path = load_card("gemma3-270m")  # by name
    b = load_backend(card, path)
    out = b.generate(["The capital of France is"], Decoding(max_tokens=8), [0])[0]
    b.close()
    assert out.completion_tokens > 0


def _card(tmp_path, body):
    p = tmp_path / "card.toml"
    p.write_text(body)
    return load_card(p)


def test_missing_and_invalid_model_files(tmp_path):
    card, path = _card(tmp_path, 'name = "x"\nbackend = "llama_cpp"\n[source]\npath = "missing.gguf"\n')
    with pytest.raises(UserError, match="model file not found"):
        load_backend(card, path)
    (tmp_path / "fake.gguf").write_text("not a model")
    card, path = _card(tmp_path, 'name = "x"\nbackend = "llama_cpp"\n[source]\npath = "fake.gguf"\n')
    with pytest.raises(UserError, match="not a GGUF file"):
        load_backend(card, path)
    card, path = _card(tmp_path, 'name = "x"\nbackend = "llama_cpp"\n[source]\npackage = "no_such_pkg"\nfile = "a.gguf"\n')
    with pytest.raises(UserError, match="not installed"):
        load_backend(card, path)


@pytest.fixture(scope="module")
def smollm_nf4():
    yield from _loaded("quantized/smollm2-135m-hf-nf4.toml")


def test_transformers_nf4_batched_equals_single(smollm_nf4):
    prompts = ["What is the capital of France?\n", "Name a red fruit.\n", PROMPT]
    p = Decoding(max_tokens=12, stop=("|EoS|",))
    batch = smollm_nf4.generate(prompts, p, [0, 0, 0])
    single = [smollm_nf4.generate([q], p, [0])[0] for q in prompts]
    assert [c.text for c in batch] == [c.text for c in single]
    assert all("|EoS|" not in c.text for c in batch)
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in smollm_nf4.model.modules())


CHATML = "<|im_start|>user\nName a red fruit.<|im_end|>\n<|im_start|>assistant\n"


def test_chat_prompt_format_llamacpp():
    """prompt_format = "chat": the model's own template wraps the prompt, its special tokens are
    tokens (not text), and the end of the turn ends the answer."""
    card, path = load_card("smollm2-135m-chat")
    b = load_backend(card, path)
    try:
        assert b._format("Name a red fruit.") == CHATML  # llama.cpp's built-in chatml
        assert len(b.tokenize("<|im_start|>", special=True)) < len(b.tokenize("<|im_start|>"))
        out = b.generate(["Name a red fruit."], Decoding(max_tokens=64), [0])[0]
        assert out.finish == "eos" and out.text.strip() and "<|im_end|>" not in out.text
        # the plain card sends the prompt as it is
        plain = load_backend(card.model_copy(update={"prompt_format": "plain"}), path)
        assert plain._format("Name a red fruit.") == "Name a red fruit."
        plain.close()
    finally:
        b.close()


def test_chat_prompt_format_transformers(smollm_nf4):
    text = smollm_nf4._format("Name a red fruit.")  # the tokenizer's jinja template (with its system turn)
    assert text.startswith("<|im_start|>system\n") and text.endswith(CHATML)
    out = smollm_nf4.generate(["Name a red fruit."], Decoding(max_tokens=48), [0])[0]
    assert out.text.strip() and "<|im_end|>" not in out.text and "assistant" not in out.text[:12]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random T5 (d_model 64) and a tokenizer trained here: no T5 weights ship on PyPI."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("t5")
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    text = [t.strip() for t in (ROOT / "seeds" / "seed_tasks.jsonl").read_text().splitlines()]
    tok.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                                          unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(d)
    cfg = T5Config(vocab_size=len(fast), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
                   num_heads=4, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                   decoder_start_token_id=fast.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(d)
    return d


@pytest.mark.parametrize("quant", ["none", "8bit", "nf4"])
def test_transformers_seq2seq_tiny_t5(tiny_t5, tmp_path, quant):
    card, path = _card(tmp_path, f'name = "t5"\nbackend = "transformers"\nquantization = "{quant}"\n'
                                 f'batch_size = 4\n[source]\npath = "{tiny_t5}"\n')
    b = load_backend(card, path)
    assert b.seq2seq
    prompts = ["Translate to French: cat", "Summarize the text below.\nA long text.", "x"]
    p = Decoding(max_tokens=8, temperature=1.0, top_k=50, top_p=1.0)
    a = b.generate(prompts, p, [3, 3, 3])
    again = b.generate(prompts, p, [3, 3, 3])
    b.close()
    assert [c.text for c in a] == [c.text for c in again]  # sampling with a fixed seed
    assert all(0 < c.completion_tokens <= 8 and c.prompt_tokens > 0 for c in a)


def test_models_list_and_check():
    r = cli("models")
    assert r.returncode == 0
    for name in ("smollm2-135m ", "gemma3-270m", "smollm2-135m-hf-nf4", "falcon-40b-q4_k_m", "flan-t5-xxl-8bit",
                 "flan-ul2-nf4", "qwen2.5-32b-instruct-q4_k_m"):
        assert name in r.stdout
    r = cli("models", "check", "smollm2-135m")
    assert r.returncode == 0 and "tok/s" in r.stdout and "peak RSS" in r.stdout, r.stderr[-2000:]
    r = cli("models", "check", "nope")
    assert r.returncode == 2 and "model card not found" in r.stderr


NEW = ["Convert the temperature from Fahrenheit to Celsius.", "Name the author of the given book.",
       "Give an antonym for the given word.", "Sort the list of numbers in ascending order."]


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_prefix_reuse_and_batches_are_byte_identical(name):
    """The fixed instance prefix evaluated once and copied vs every prompt evaluated whole: the same
    bytes for the same seeds; and a rerun of the same batches gives the same bytes again."""
    from ensemble_instruct import templates
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend
    from ensemble_instruct.weights import resolve as resolve_weights
    from ensemble_instruct.stages.instances import STOP

    card, path = load_card(name)
    card = card.model_copy(update={"parallel": 2})
    tpl = templates.load("instances_B.txt")
    prefix = templates.prefix(tpl, "instruction")
    prompts = [templates.fill(tpl, instruction=t) for t in NEW]
    p = Decoding(max_tokens=24, temperature=0.7, top_k=50, top_p=1.0, stop=STOP)
    seeds = [11, 12, 13, 14]
    on = LlamaCppBackend(card, resolve_weights(card, path))
    first = on.generate(prompts, p, seeds, prefix=prefix)
    on.generate(["An unrelated prompt"], p, [1], prefix="An unrelated")  # the prefix slot changes
    again = on.generate(prompts, p, seeds, prefix=prefix)
    on.close()
    off = LlamaCppBackend(card, resolve_weights(card, path), reuse_prefix=False)
    whole = off.generate(prompts, p, seeds, prefix=prefix)
    off.close()
    assert [c.text for c in first] == [c.text for c in again] == [c.text for c in whole]
    assert [c.finish for c in first] == [c.finish for c in whole]
    assert all(c.prompt_tokens > 700 for c in first) and sum(bool(c.text.strip()) for c in first) >= 3


def test_a_window_depends_on_its_own_requests_only(smollm):
    """Continuous batching: a request's text may depend on the other requests of its window (they
    share decoding calls), never on requests outside it; the same window gives the same bytes;
    each sequence keeps its own seed."""
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend
    from ensemble_instruct.weights import resolve as resolve_weights

    card, path = load_card("smollm2-135m")
    b = LlamaCppBackend(card.model_copy(update={"parallel": 2, "window": 3}), resolve_weights(card, path))
    p = Decoding(max_tokens=20, temperature=0.7, top_k=50, top_p=1.0)
    first = [PROMPT, "Name a red fruit.\n", PROMPT]
    together = b.generate(first + ["The capital of France is", "Once upon a time"], p, [1, 2, 3, 4, 5])
    alone = b.generate(first, p, [1, 2, 3])  # the same window, without the next one
    b.close()
    assert [c.text for c in together[:3]] == [c.text for c in alone]
    assert together[0].text != together[2].text  # same prompt, other seed
    assert smollm.parallel == 16 and smollm.window == 128  # the card's default: 8 x parallel


def test_card_parallel_is_part_of_the_run_fingerprint(tmp_path):
    from ensemble_instruct.rundir import open_run

    (tmp_path / "q").mkdir()
    for n in ("smollm2-135m", "gemma3-270m", "smollm2-135m-hf-nf4"):
        (tmp_path / "q" / f"{n}.toml").write_text((ROOT / "quantized" / f"{n}.toml").read_text())
    cfg = (ROOT / "configs" / "ci.toml").read_text().replace('"quantized/', f'"{tmp_path}/q/')
    cfg = f'seeds_file = "{ROOT}/seeds/seed_tasks.jsonl"\ntemplates_dir = "{ROOT}/templates"\n' + cfg
    (tmp_path / "c.toml").write_text(cfg)
    open_run(tmp_path / "c.toml", tmp_path / "run")
    card = tmp_path / "q" / "smollm2-135m.toml"
    card.write_text(card.read_text().replace("parallel = 16", "parallel = 4"))
    with pytest.raises(UserError, match=r"parallel \(16 -> 4\)"):
        open_run(tmp_path / "c.toml", tmp_path / "run")


def test_llamacpp_cuts_a_loop_short(smollm):
    """loop_test: a completion that has become a repetition loop ends early with finish "loop"."""
    prompt = "Repeat after me.\n" + "I like apples.\n" * 40
    from ensemble_instruct.parsing import repetitive

    p = Decoding(max_tokens=400, loop_test=repetitive)
    out = smollm.generate([prompt], p, [0])[0]
    assert out.finish == "loop" and out.completion_tokens < 400
    assert smollm.generate([prompt], Decoding(max_tokens=400), [0])[0].finish == "length"


def test_llamacpp_frees_the_model_when_the_chat_template_is_missing(monkeypatch):
    """A chat card on a GGUF without a chat template (Gemma-3-270M base) is a one-line error, and
    the model already loaded is freed, not leaked."""
    import llama_cpp

    freed = []
    free = llama_cpp.llama_model_free
    monkeypatch.setattr(llama_cpp, "llama_model_free", lambda m: (freed.append(m), free(m)))
    card, path = load_card("gemma3-270m")
    with pytest.raises(UserError, match="no chat template"):
        load_backend(card.model_copy(update={"prompt_format": "chat"}), path)
    assert len(freed) == 1


@pytest.mark.parametrize("kv", ["split", "unified"])
def test_a_window_does_not_depend_on_how_large_the_cache_grew(kv):
    """The KV cache is sized to what a window needs and only grows, so a rerun or a resume may
    run a window in a larger cache than the first run did: the bytes must be the same. The size
    is the kv_cells formula: in the unified layout the prefix is stored once."""
    from ensemble_instruct import templates
    from ensemble_instruct.kvcache import kv_cells
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend
    from ensemble_instruct.weights import resolve as resolve_weights

    card, path = load_card("smollm2-135m")
    b = LlamaCppBackend(card.model_copy(update={"parallel": 2, "kv": kv}), resolve_weights(card, path))
    tpl = templates.load("instances_A.txt")
    prefix = templates.prefix(tpl, "instruction")
    prompts = [templates.fill(tpl, instruction=t) for t in NEW[:3]]
    p = Decoding(max_tokens=24, temperature=0.7, top_k=50, top_p=1.0)
    small = b.generate(prompts, p, [5, 6, 7], prefix=prefix)
    toks = [b.tokenize(x) for x in prompts]
    shared = len(b.prefix_tokens)
    per_seq = max(len(t) for t in toks) + 24 - (shared if kv == "unified" else 0)
    assert (b.n_ctx, b.n_seq) == kv_cells(kv, 2, shared, per_seq)
    size = b.n_ctx
    b.generate(prompts[:2], Decoding(max_tokens=900), [1, 2], prefix=prefix)  # the cache grows
    assert b.n_ctx > size and b.layout == kv
    again = b.generate(prompts, p, [5, 6, 7], prefix=prefix)
    b.close()
    assert b.n_ctx >= size and [c.text for c in small] == [c.text for c in again]
    if kv == "unified":  # 3 prompts of ~900 tokens in 2 slots: the prefix once, not per sequence
        assert size < 2 * shared


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_sampling_picks_what_llama_cpps_own_sampler_picks(name):
    """`_sample` reads the logits with numpy instead of llama_sampler_sample's per-call copy of the
    whole vocabulary. At every step of 8 sequences it must pick the token that llama.cpp's own
    llama_sampler_sample picks from the same logits with a twin chain (same seed): greedy, top-k 50
    at T=0.7, and the whole vocabulary at T=1 (top_k = 0)."""
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend
    from ensemble_instruct.weights import resolve as resolve_weights

    class Twin(LlamaCppBackend):
        def _sampler(self, params, seed):  # called once per request, in request order
            self.twins.append(super()._sampler(params, seed) or self.greedy)
            return super()._sampler(params, seed)

        def _sample(self, slot, params, k):
            ours = super()._sample(slot, params, k)
            self.picks.append((ours, self.L.llama_sampler_sample(self.twins[slot.index], self.ctx, k)))
            return ours

    card, path = load_card(name)
    b = Twin(card.model_copy(update={"parallel": 8}), resolve_weights(card, path))
    L = b.L
    b.greedy = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(b.greedy, L.llama_sampler_init_greedy())
    b.picks = []
    prompts = [f"Once upon a time, a {w} lived in a small town by the sea. Every morning, the {w}"
               for w in "cat dog king queen robot pirate farmer doctor".split()]
    for params in (Decoding(32), Decoding(32, 0.7, 50, 1.0), Decoding(32, 1.0, 0, 1.0)):
        b.twins = []
        b.generate(prompts, params, list(range(8)))
        for t in [t for t in b.twins if t is not b.greedy]:
            L.llama_sampler_free(t)
    L.llama_sampler_free(b.greedy)
    b.close()
    assert len(b.picks) > 3 * 8 * 24 and all(ours == theirs for ours, theirs in b.picks)


def test_split_streams_keep_live_slots_contiguous():
    """Split KV streams: llama.cpp takes only consecutive sequence ids into one pass, so once no
    request is left to refill a finished slot, the highest live slots move into the gaps: every
    step's live slots are 0..n-1. Moving a sequence copies its KV stream; a rerun gives the same
    bytes."""
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend
    from ensemble_instruct.weights import resolve as resolve_weights

    class Traced(LlamaCppBackend):
        def _execute(self, step, params):
            self.steps.append(sorted({e.seq for e in step.entries}))
            return super()._execute(step, params)

    card, path = load_card("gemma3-270m")
    b = Traced(card.model_copy(update={"parallel": 6, "kv": "split"}), resolve_weights(card, path))
    b.steps = []
    prompts = [f"{q}\nAnswer:" for q in ("Name a fruit.", "Describe the sea in one long sentence.", "What is 2 + 2?",
                                          "List three colors.", "Explain why the sky is blue.", "Say hello.",
                                          "Write a sentence about a dog.", "What is the capital of France?")]
    p = Decoding(max_tokens=40, stop=("\n",))
    first = b.generate(prompts, p, list(range(8)))
    again = b.generate(prompts, p, list(range(8)))
    b.close()
    assert [c.text for c in first] == [c.text for c in again]
    assert all(live == list(range(len(live))) for live in b.steps)
    assert len({len(live) for live in b.steps}) > 3  # slots did finish at different steps


@pytest.mark.parametrize("name,kv", [("gemma3-270m", "split"), ("smollm2-135m", "unified")])
def test_an_odd_count_of_logit_rows_gets_one_more_and_the_texts_stay_the_same(name, kv):
    """Odd row counts are slow in llama.cpp's CPU output matmul, so a step whose first pass has an
    odd number (3 or more) of logit rows asks for one more: a refilled slot's first prompt token, or
    a dummy token in a spare sequence. Those rows are never sampled: the texts equal those of the
    same windows without the padding, in both KV layouts, and both kinds of padding happened."""
    from ensemble_instruct.backends.llamacpp import LlamaCppBackend
    from ensemble_instruct.weights import resolve as resolve_weights

    class Traced(LlamaCppBackend):
        padded = []

        def _execute(self, step, params):
            if sum(e.logits for e in step.entries) > len(step.samples):  # a row nobody samples
                self.padded.append("spare" if step.spare is not None else "prompt token")
            return super()._execute(step, params)

    card, path = load_card(name)
    b = Traced(card.model_copy(update={"parallel": 5, "window": 12, "kv": kv}), resolve_weights(card, path))
    prefix = "Answer each question in one line.\n\n" if kv == "unified" else None
    questions = ("Name a fruit.", "Describe the sea in one long sentence.", "What is 2 + 2?", "List three colors.",
                 "Explain why the sky is blue.", "Say hello.", "Write a sentence about a dog.",
                 "What is the capital of France?", "Name two animals.", "Why do birds sing?",
                 "Tell me a joke about cats and dogs.", "Count to five.")
    prompts = [f"{prefix or ''}Question: {q}\nAnswer:" for q in questions]
    p = Decoding(max_tokens=40, temperature=0.7, top_k=50, stop=("\n",))
    padded = b.generate(prompts, p, list(range(12)), prefix=prefix)
    b.even_rows = False
    plain = b.generate(prompts, p, list(range(12)), prefix=prefix)
    b.close()
    assert [c.text for c in padded] == [c.text for c in plain]
    assert {"spare", "prompt token"} <= set(b.padded), b.padded
