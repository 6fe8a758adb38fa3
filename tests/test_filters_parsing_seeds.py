import json
import re

import pytest

from conftest import SEEDS
from ensemble_instruct.errors import UserError
from ensemble_instruct.filters import process_completion, reject_reason, split_items
from ensemble_instruct.parsing import parse_instance
from ensemble_instruct.seeds import load_seeds, split_types
from ensemble_instruct import templates


def test_seed_split_125_50():
    tasks = load_seeds(SEEDS)
    parts = split_types(tasks)
    assert len(tasks) == 175 and len(parts["A"]) == 125 and len(parts["B"]) == 50


@pytest.mark.parametrize("content,expected", [
    ("", "no seed tasks"),
    ('{"instruction": "x", "instances": [{"input": "", "output": "y"}]}\n{bad json\n', ":2: not valid JSON"),
    ('{"instances": [{"input": "", "output": "y"}]}\n', ":1: missing or empty 'instruction'"),
    ('{"instruction": "x"}\n', ":1: missing or empty 'instances'"),
    ('[1, 2]\n', ":1: expected a JSON object"),
])
def test_bad_seed_files(tmp_path, content, expected):
    p = tmp_path / "seeds.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_seeds(p)
    with pytest.raises(UserError, match="not found"):
        load_seeds(tmp_path / "missing.jsonl")


def test_split_items_and_eos():
    c = " Write a haiku about a dog watching a sunset. |EoS|\n26. Summarize the   text\nbelow in one line. |EoS|\n27."
    assert split_items(c) == ["Write a haiku about a dog watching a sunset.",
                              "Summarize the text below in one line."]
    assert split_items("") == []
    assert split_items("\n3. Only the second item here |EoS|") == ["Only the second item here"]


@pytest.mark.parametrize("item,reason", [
    ("Tell a joke.", "too_short"),
    ("Tell me a joke.", None),
    ("one two three", "too_short"),
    ("Name four big rivers", None),
    (" ".join(["word"] * 151), "too_long"),
    (" ".join(["word"] * 150), None),
    ("Describe the image of a cat in detail.", "blocked_word"),
    ("Look at these Graphs and explain them", "blocked_word"),
    ("Tell me how to go to the station", "blocked_word"),
    ("Explain how a mapping function works in Python", None),  # map only as a whole word
    ("Write a program that sorts numbers", "write_a_program"),
    ("- List some good fruit to eat", "starts_with_punctuation"),
    ("Écris une phrase en français ici", "starts_non_ascii"),
    ("Summarize a news article in three sentences.", None),
])
def test_reject_reasons(item, reason):
    assert reject_reason(item) == reason


def test_process_completion_reports_reason_per_item():
    assert process_completion("Draw a cat for me please |EoS|") == [("Draw a cat for me please", "blocked_word")]


def test_parse_type_a():
    p = parse_instance(" The sky is blue.\noutput: Positive\n", True)
    assert (p.input, p.output, p.reason) == ("The sky is blue.", "Positive", None)
    code = " [3, 1, 2]\noutput:\ndef f(x):\n    return sorted(x)\n\nprint(f([3, 1, 2]))\n|EoS|\ninstruction: next"
    p = parse_instance(code, True)
    assert p.output == "def f(x):\n    return sorted(x)\n\nprint(f([3, 1, 2]))" and p.reason is None
    assert parse_instance(" just text, no output field", True).reason == "no_output_field"
    assert parse_instance(" some input\noutput:   \n", True).reason == "empty_output"
    assert parse_instance("\noutput: x", True).reason == "empty_input"
    assert parse_instance(" in\nOutput: stops here\ninstruction: another task", True).output == "stops here"


def test_parse_type_b():
    p = parse_instance(" 1. Apples\n2. Pears\n|EoS|", False)
    assert (p.output, p.reason) == ("1. Apples\n2. Pears", None)
    assert parse_instance("   |EoS|", False).reason == "empty_output"
    assert parse_instance("bad \ufffd bytes", False).reason == "invalid_text"


def test_templates_fill_without_reexpanding_data():
    tasks = load_seeds(SEEDS)
    a = split_types(tasks)["A"]
    t = templates.load("instances_random_A.txt")
    prompt = templates.instance_prompt(t, a[:2], "Use {demos} literally", True)
    assert prompt.count("|EoS|") == 2 and prompt.endswith("instruction: Use {demos} literally\ninput:")
    p = templates.instruction_prompt(templates.load("instructions_B.txt"), ["x y z w", "a b c d"])
    assert "1. x y z w |EoS|\n2. a b c d |EoS|\n3." in p and p.endswith("3.")


def test_split_items_only_at_numbered_list_items():
    """As the reference (`\\n\\d+\\s?\\. `): a line that starts with a decimal is not a new item."""
    c = "Convert the amount:\n2.5 liters to gallons. |EoS|\n5 . Name a bird that cannot fly. |EoS|\n6."
    assert split_items(c) == ["Convert the amount: 2.5 liters to gallons.", "Name a bird that cannot fly."]


def test_instruction_prompt_shows_seeds_normalized():
    p = templates.instruction_prompt("{tasks}{next}.", ["Fix the   grammar:\n", "Name a fruit."])
    assert p == "1. Fix the grammar |EoS|\n2. Name a fruit. |EoS|\n3."


@pytest.mark.parametrize("text,loops", [
    ("The machine is a machine that can perform tasks. " * 20, True),
    ("Yes\nYes\nYes\nNo", True),
    ("1. Yes\n2. Yes\n3. Yes\n4. Yes", True),  # only the numbers differ
    (", ".join(str(160 + 5 * k) for k in range(60)), True),  # a counting loop
    ("1, 2, 3, 5, 8, 13", False),  # a short list of numbers is an answer
    ("def add(a, b):\n    return a + b\n\nprint(add(1, 2))", False),
    ("Paris is the capital of France. It lies on the Seine and has about two million people.", False),
    ("- apples\n- pears\n- plums\n- cherries", False),
    ("The answer is 1" + "0" * 40, True),  # a loop inside one word: the word rules miss it
    ("100," + "000," * 10, True),
    ("1. <strong>" + "<u>" * 14, True),
    ("One googol is 1" + "0" * 100 + ".", True),
    ("A trillion is 1,000,000,000,000 and a billion is 1000000000.", False),
    ("| a | b |\n| --- | --- |\n| 1 | 2 |", False),
    ("Title\n" + "=" * 39, False),
])
def test_repetitive(text, loops):
    from ensemble_instruct.parsing import repetitive
    assert repetitive(text) is loops


def test_a_run_of_one_unit_stays_repetitive_as_the_text_grows():
    """The engine cuts a completion when a prefix of it is repetitive; for the run rule that is
    lossless by construction: every longer text that starts with such a prefix is repetitive too."""
    from ensemble_instruct.parsing import repetitive
    loop = "Total: 100," + "000," * 10
    assert repetitive(loop)
    for tail in (" dollars.", "\nThat is a lot of money, more than anyone could spend in a life.",
                 " " + " ".join(f"word{k}" for k in range(200))):
        assert repetitive(loop + tail)


def test_the_instance_loop_test_judges_input_and_output_each_on_its_own():
    """The engine's early loop test for instances agrees with the instance filter: an output that
    copies its input repeats the whole text but neither field (the filter keeps it, so the test
    must not cut it); a field that loops on its own is cut, the input also before the output starts."""
    from ensemble_instruct.parsing import looping, repetitive

    copied = (" Top 2 reasons: 1. A person should not take a holiday for the Earth. 2. A person should not take "
              "a holiday for the Moon.\noutput: Top 2 reasons: 1. A person should not take a holiday for the "
              "Earth. 2. A person should not go.")  # a SmolLM2 instance, kept by the filter
    assert repetitive(copied)  # as a whole: what the engine used to test
    assert parse_instance(copied, True, "Give two reasons.").reason is None and not looping(copied, True)
    assert looping(" ok ok ok ok ok ok ok ok ok ok ok ok ok ok", True)  # no output field yet
    assert looping(" a cat\noutput: no no no no no no no no no no no no no no", True)
    assert looping(" no no no no no no no no no no no no no no", False)
    assert not looping(" a cat\noutput: It sat on the mat all day long.", True)


def test_instance_finish_reasons_and_echo():
    assert parse_instance(" 42\n", False, "What is 6 x 7?", "length").reason == "token_limit"
    assert parse_instance("", False, "x", "prompt_too_long").reason == "prompt_too_long"
    assert parse_instance(" What is 6 x 7\n", False, "What is 6 x 7?", "stop").reason == "echo"
    assert parse_instance(" 42\n", False, "What is 6 x 7?", "eos").reason is None
    assert parse_instance(" 42 42 42", False, "What is 6 x 7?", "loop").reason == "repetitive"
    from ensemble_instruct.stages.outputs import reason
    inst = {"instruction": "Name a fruit.", "input": ""}
    assert reason("", "stop", inst) == "empty_output"
    assert reason("name a fruit", "stop", inst) == "echo"
    assert reason("Apple.", "length", inst) is None  # an extra output may be cut: the ensemble judges it
    assert reason("", "prompt_too_long", inst) == "prompt_too_long"
    assert reason("Apple apple apple", "loop", inst) == "repetitive"  # the engine cut a loop short


def test_fixed_instance_prefixes_are_the_reference_demos():
    """18 (A) and 15 (B) seed demonstrations, every prompt of a type starting with the same text."""
    seeds = {t.instruction.strip() for t in load_seeds(SEEDS)}
    for typ, n in (("A", 18), ("B", 15)):
        tpl = templates.load(f"instances_{typ}.txt")
        pre = templates.prefix(tpl, "instruction")
        assert pre.count("instruction:") == n + 1 and pre.count(templates.EOS) == n
        shown = re.findall(r"^instruction: (.*?)\n(?:input|output):", pre, re.DOTALL | re.MULTILINE)
        assert len(shown) == n and all(s.strip() in seeds for s in shown), typ
        assert templates.fill(tpl, instruction="Name a fruit.").startswith(pre)


def test_extra_outputs_cut_loops_short_and_evaluate_does_not(tmp_path, monkeypatch):
    """A looping extra output is dropped anyway, so the stage lets the engine cut it short; an
    evaluated answer is scored as the model wrote it, so `evaluate` (which answers through the same
    function with its default) does not."""
    import fakes
    from ensemble_instruct.rundir import open_run
    from ensemble_instruct.stages import outputs

    fakes.install(monkeypatch)
    run = open_run(fakes.fake_setup(tmp_path), tmp_path / "run")
    asked = {}
    monkeypatch.setattr(outputs, "run_batches", lambda run, backend, **kw: asked.__setitem__(kw["key"], kw["params"]))
    backend = fakes.FakeBackend(run.extras[0][0])
    outputs.run_stage(run, backend, "A")
    outputs.answer(run, backend, [], tmp_path / "answers.jsonl", key="evaluate", stage="evaluate/x", typ="A", where="x")
    assert asked["outputs_extra1_A"].loop_test is outputs.loops and asked["evaluate"].loop_test is None
