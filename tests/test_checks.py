"""Checks made when a run is opened (templates) and stage behaviour at the edges (a prompt that does
not fit, more instructions than asked for, a server's bad answer), with fake models. Loading and
validating cards and configs: tests/test_config.py."""
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import fakes
from conftest import ROOT, read_jsonl
from ensemble_instruct import rundir, templates
from ensemble_instruct.backends import Completion, too_long
from ensemble_instruct.config import load_card
from ensemble_instruct.errors import UserError
from ensemble_instruct.stages import ensemble, instances, instructions, outputs


def opened(tmp_path, monkeypatch, **kw):
    fakes.install(monkeypatch)
    return rundir.open_run(fakes.fake_setup(tmp_path, **kw), tmp_path / "run")


# ------------------------------------------------------------ templates

@pytest.mark.parametrize("name,text,field", [
    ("instances_A.txt", "Tasks.\n\ninstruction: {instruction}\ninput: {input}", "{input}"),
    ("instructions_B.txt", "Make up tasks.\n{tasks}{nxt}.", "{nxt}"),
    ("output.txt", "{instrution}\n{input}", "{instrution}"),
])
def test_unknown_template_field_is_refused_with_file_and_line(tmp_path, name, text, field):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        templates.load(name, tmp_path)
    line = text[: text.index(field)].count("\n") + 1
    assert str(e.value).startswith(f"{tmp_path / name}:{line}: unknown field {field} (this template can use ")


def test_bundled_templates_load():
    for path in sorted((ROOT / "templates").glob("*.txt")):
        templates.load(path.name)


def test_a_bad_template_stops_the_run_before_any_model_loads(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "templates", tmp_path / "templates")  # next to the config: used instead
    (tmp_path / "templates" / "output_base.txt").write_text("{instruction}\n{input}\nAnswer ({langauge}):")
    config = fakes.fake_setup(tmp_path)
    card = tmp_path / "cards" / "extra2.toml"
    card.write_text('output_template = "output_base.txt"\n' + card.read_text())  # before its [source] table
    fakes.install(monkeypatch)
    loads = []
    monkeypatch.setattr("ensemble_instruct.runner.load_backend", lambda *a: loads.append(a))
    with pytest.raises(UserError, match=r"templates/output_base.txt:3: unknown field \{langauge\}"):
        rundir.open_run(config, tmp_path / "run")
    assert loads == [] and not (tmp_path / "run").exists()


# ------------------------------------------------------------ stages at the edges

class Words(fakes.FakeBackend):
    def count_tokens(self, text):
        return len(text.split())


def test_demonstrations_must_fit_the_context(tmp_path, monkeypatch):
    run = opened(tmp_path, monkeypatch)
    prefix = len(templates.fill(templates.load("instances_A.txt"), instruction="").split())
    need = prefix + 96 + 64  # the fixed prompt (type A is the longer one) + max_tokens + an instruction
    card = run.generator[0]
    instances.check_fits(run, Words(card.model_copy(update={"context": need})))  # fits exactly
    with pytest.raises(UserError) as e:
        instances.check_fits(run, Words(card.model_copy(update={"context": need - 1})))
    assert str(e.value) == (f"gen: the fixed prefix of templates/instances_A.txt + [instances] max_tokens 96 + an "
                            f"instruction need {need} tokens, more than its context of {need - 1}; use fewer or "
                            "shorter demonstrations, a smaller max_tokens, or a model with a longer context")


def test_sampled_demonstrations_are_checked_at_their_longest(tmp_path, monkeypatch):
    fakes.install(monkeypatch)
    config = fakes.fake_setup(tmp_path)
    config.write_text(config.read_text().replace("[instances]\n", "[instances]\ndemos = { A = 3, B = 2 }\n"))
    run = rundir.open_run(config, tmp_path / "run")
    longest = sorted(run.seeds["A"], key=lambda t: -len(templates.demo_block(t, True)))[:3]
    prompt = templates.instance_prompt(templates.load("instances_random_A.txt"), longest, "", True)
    need = len(prompt.split()) + 96 + 64
    card = run.generator[0]
    instances.check_fits(run, Words(card.model_copy(update={"context": need + 1000})))
    with pytest.raises(UserError, match=rf"3 demonstrations \(type A, the longest\) .* need {need} tokens"):
        instances.check_fits(run, Words(card.model_copy(update={"context": need - 1})))


class ThreeAtOnce(fakes.FakeBackend):
    """Ignores |EoS| and lists three new instructions in one completion."""

    def generate(self, prompts, params, seeds, prefix=None):
        text = (" Describe the water cycle for a ten year old student.\n"
                "12. Convert the following recipe from metric to imperial units.\n"
                "13. Suggest three names for a bakery that sells only bread.")
        return [Completion(text, 10, 30, "stop") for _ in prompts]


def test_items_beyond_the_target_are_marked_over_target(tmp_path, monkeypatch):
    run = opened(tmp_path, monkeypatch)  # target A = 2
    instructions.run_stage(run, ThreeAtOnce(run.generator[0], window=1), "A")
    recs = read_jsonl(run.file("instructions_A.jsonl"))
    assert len(recs) == 1  # one request was enough
    assert [(it["status"], it["reason"]) for it in recs[0]["items"]] == [
        ("accepted", None), ("accepted", None), ("rejected", "over_target")]
    assert [it.get("id") for it in recs[0]["items"]] == ["A00001", "A00002", None]


class TooLongFor(fakes.FakeBackend):
    """A backend's fallback for a prompt longer than its context: an empty `prompt_too_long`
    completion, and the batch goes on."""

    def __init__(self, card, word, **kw):
        super().__init__(card, **kw)
        self.word = word

    def generate(self, prompts, params, seeds, prefix=None):
        done = super().generate(prompts, params, seeds)
        return [too_long(999) if self.word in p else c for p, c in zip(prompts, done)]


def test_prompt_too_long_is_recorded_and_counts_as_empty(tmp_path, monkeypatch):
    run = opened(tmp_path, monkeypatch, target=(3, 1))
    gen = fakes.FakeBackend(run.generator[0])
    for typ in "AB":
        instructions.run_stage(run, gen, typ)
    accepted = [it["text"] for it in instructions.accepted(instructions.records(run, "A"))]
    for typ in "AB":  # the instance prompt of the first type-A instruction does not fit
        instances.run_stage(run, TooLongFor(run.generator[0], f"instruction: {accepted[0]}\n"), typ)
    inst = read_jsonl(run.file("instances_A.jsonl"))
    assert [(r["reason"], r["finish"]) for r in inst] == [("prompt_too_long", "prompt_too_long"),
                                                           (None, "stop"), (None, "stop")]
    (c1, _), (c2, _) = run.extras
    for typ in "AB":  # extra model 1 has no room for the second instruction's prompt
        outputs.run_stage(run, TooLongFor(c1, accepted[1]), typ)
        outputs.run_stage(run, fakes.FakeBackend(c2), typ)
    out1 = read_jsonl(run.file("outputs_extra1_A.jsonl"))
    assert [(r["output"], r["reason"]) for r in out1] == [("", "prompt_too_long"),
                                                           (fakes.answer_for(accepted[2]), None)]
    ensemble.run_stage(run)
    ens = read_jsonl(run.file("ensemble_A.jsonl"))
    # generator and extra2 agree exactly; extra1 missing counts as an empty candidate, never a winner
    assert [(r["instruction"], r["kept"], r["rule"], r["agreeing"]) for r in ens] == [
        (accepted[1], True, "exact", ["gen", "extra2"]), (accepted[2], True, "exact", ["gen", "extra1", "extra2"])]


# ------------------------------------------------------------ a server that answers nonsense

class Scripted(BaseHTTPRequestHandler):
    answers: dict = {}
    seen: list = []

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "m"}]}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scripted.seen.append((self.path, body))
        self._send(*Scripted.answers.get(self.path, (404, "no such endpoint")))

    def _send(self, code, text):
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Scripted.answers, Scripted.seen = {}, []
    yield httpd.server_address[1]
    httpd.shutdown()


def server_backend(tmp_path, port, fmt="plain"):
    from ensemble_instruct.backends import load_backend

    card = tmp_path / "server.toml"
    card.write_text(f'name = "srv"\nbackend = "openai"\nbase_url = "http://127.0.0.1:{port}"\nmodel = "m"\n'
                    f'prompt_format = "{fmt}"\nretries = 0\n')
    return load_backend(*load_card(card))


@pytest.mark.parametrize("answer,what", [
    ("<html><body>502 Bad Gateway</body></html>", "but a body that is not JSON"),
    ('{"object": "text_completion"}', "but JSON without 'choices'"),
    ('{"choices": []}', "but JSON without 'choices'"),
    ('["a list"]', "but JSON without 'choices'"),
])
@pytest.mark.models  # the openai backend needs httpx (the server extra), not in the core install
def test_server_answering_200_without_a_completion(tmp_path, server, answer, what):
    from ensemble_instruct.backends import Decoding
    from ensemble_instruct.errors import BadResponse

    backend = server_backend(tmp_path, server)
    Scripted.answers["/v1/completions"] = (200, answer)
    with pytest.raises(BadResponse) as e:
        backend.generate(["hello"], Decoding(8), [0])
    assert e.value.exit_code == 4 and "\n" not in str(e.value)
    assert str(e.value).startswith(f"srv: the server at http://127.0.0.1:{server} answered /v1/completions with "
                                   f"HTTP 200 {what}")


@pytest.mark.models  # httpx, as above
def test_server_chat_format_and_context_overflow(tmp_path, server):
    from ensemble_instruct.backends import Decoding

    backend = server_backend(tmp_path, server, fmt="chat")
    Scripted.answers["/v1/chat/completions"] = (200, json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 2}}))
    c = backend.generate(["Say hi."], Decoding(8), [3])[0]
    assert (c.text, c.finish, c.prompt_tokens) == ("Hi!", "stop", 5)
    path, body = Scripted.seen[-1]
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "Say hi."}]
    assert body["seed"] == 3 and "prompt" not in body
    # a prompt the server refuses as too long: the prompt_too_long fallback, the batch goes on
    Scripted.answers["/v1/chat/completions"] = (400, "This model's maximum context length is 8192 tokens")
    assert backend.generate(["x"], Decoding(8), [0])[0].finish == "prompt_too_long"


@pytest.mark.parametrize("rc,kind", [(1, "OutOfMemory"), (-3, "OutOfMemory"), (-1, "UserError")])
def test_llamacpp_decode_failure_kinds(rc, kind):
    """llama_decode's 1 (no room in the KV cache) and allocation failures exit 3, not 2."""
    from types import SimpleNamespace

    from ensemble_instruct.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend.__new__(LlamaCppBackend)  # no model: only the error mapping is under test
    b.L, b.ctx = SimpleNamespace(llama_decode=lambda ctx, batch: rc), None
    b.card = SimpleNamespace(name="tiny")
    b.batch = SimpleNamespace(token=[0], pos=[0], n_seq_id=[0], logits=[0], seq_id=[[0]], n_tokens=0)
    with pytest.raises(UserError) as e:
        b._decode([(5, 0, 0, True)])
    assert type(e.value).__name__ == kind and f"llama_decode returned {rc}" in str(e.value)
