"""A model load looks nothing up on the hub beyond the card's own weights: with HF_HUB_OFFLINE unset
and HF_ENDPOINT pointing at a recorder on loopback, loading the tiny model in 4-bit (bitsandbytes,
which fetches a CPU kernel from the hub when it can) makes no request. finetune is checked the same
way in test_finetune.py."""
import pytest

from conftest import ROOT, cli, user_visible

pytestmark = pytest.mark.models


def test_nf4_load_makes_no_hub_request_and_prints_no_warning(hub):
    r = cli("models", "check", ROOT / "quantized" / "smollm2-135m-hf-nf4.toml",
            env=hub.env({"OMP_NUM_THREADS": "1"}), offline=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "smollm2-135m-hf-nf4: loaded in" in r.stdout
    assert hub.requests == []
    assert user_visible(r.stderr) == [], r.stderr[-2000:]
