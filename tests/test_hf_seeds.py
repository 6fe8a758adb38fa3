"""The transformers backend samples each request with its own seed: a request's text depends on
its prompt and seed, not on the requests batched with it."""
import pytest

from ensemble_instruct.backends import Decoding
from ensemble_instruct.backends import hf
from ensemble_instruct.config import load_card

pytestmark = pytest.mark.models

SAMPLED = Decoding(max_tokens=24, temperature=0.7, top_k=50, top_p=1.0)
PROMPT = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def backend():
    # The real SmolLM2 through transformers, as the CI card loads it, in plain fp32 (the card's
    # name is kept: the GGUF's safetensors conversion is cached under it).
    card, path = load_card("quantized/smollm2-135m-hf-nf4.toml")
    b = hf.load(card.model_copy(update={"quantization": "none", "dtype": "float32"}), path)
    yield b
    b.close()


def test_a_sampled_request_does_not_depend_on_its_batch(backend):
    alone = backend.generate([PROMPT], SAMPLED, [11])[0]
    assert alone.completion_tokens > 0
    batch = backend.generate(["Name three colors.", PROMPT, "Explain to a child why it rains, in detail."],
                             SAMPLED, [5, 11, 99])
    assert batch[1].text == alone.text
    other = backend.generate(["List two fruits.", "What is 2 + 2?", PROMPT], SAMPLED, [6, 7, 11])
    assert other[2].text == alone.text
    assert backend.generate(["Name three colors."], SAMPLED, [5])[0].text == batch[0].text


def test_other_seeds_give_other_text(backend):
    texts = {backend.generate([PROMPT], SAMPLED, [seed])[0].text for seed in (1, 2, 3)}
    assert len(texts) == 3
