"""Example prompts fit the model they run on (issue 23): the embedded models' tokenizers keep 8 tokens per encoder
(tiny-*: byte-level, 6 bytes between CLIP's begin and end tokens; digits-sd3: the toy world's words), so an example
like "a red fox" would run as "a red ". Every prompt the READMEs pass with ``--prompt "..."`` or ``generate([...])``,
the probe's built-in prompts for the embedded models and bench.serve's, tokenized by the model's own tokenizers.
And the manifest schema version engines/README.md states."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from onex_export.export.components import load_components
from onex_export.models import DEFAULT_MODEL
from onex_export.models.weights import transformer_source
from onex_export.models.zoo import TINY_MODELS, TRAINED_MODELS
from onex_export.probe.run import calibration_prompts

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = (*TINY_MODELS, *TRAINED_MODELS)
PROMPT = re.compile(r'--prompt "([^"]*)"|generate\(\[([^\]]*)\]')


def tokenizers(model: str):
    cfg = SimpleNamespace(**transformer_source(model)[0])
    return load_components(model, cfg, ("text",)).tokenizers


def misfits(model: str, prompts) -> list[str]:
    """The prompts ``model``'s tokenizers cut short or do not know a word of, each with why."""
    toks, out = tokenizers(model), []
    for prompt in prompts:
        tokenized = toks([prompt])
        out += list(tokenized.truncated)
        for name, tok in toks.items():
            ids = {"clip_l": tokenized.ids_l, "clip_g": tokenized.ids_g, "t5": tokenized.ids_t5}[name]
            if tok.unk_token_id is not None and tok.unk_token_id in ids.tolist()[0]:
                out.append(f"{name} of {model} does not know a word of {prompt!r}")
    return out


def readme_prompts() -> list[tuple[str, str, str]]:
    """(README, model, prompt) for each example prompt: the model is the embedded one named on the line, else the
    default one (what `onex-export build` builds and a bare `--build DIR` example stands for)."""
    found = []
    for readme in ("README.md", "engines/README.md"):
        for line in (ROOT / readme).read_text().splitlines():
            named = [m for m in EMBEDDED if m in line]
            for match in PROMPT.finditer(line):
                prompts = [match.group(1)] if match.group(1) is not None else re.findall(r'"([^"]*)"', match.group(2))
                found += [(readme, named[0] if named else DEFAULT_MODEL, p) for p in prompts]
    return found


def test_the_readmes_example_prompts_fit_their_models():
    found = readme_prompts()
    assert len(found) >= 5 and {model for _, model, _ in found} == {DEFAULT_MODEL}  # the parser sees the examples
    assert ("README.md", "digits-sd3", "a red 7 on the left") in found
    for model in {model for _, model, _ in found}:
        assert misfits(model, [p for _, m, p in found if m == model]) == []


def test_built_in_prompts_for_the_embedded_models_fit():
    for model in EMBEDDED:
        assert misfits(model, calibration_prompts(model, None)) == [], model


def test_a_prompt_too_long_or_of_unknown_words_is_caught():
    """Negative: the check finds what the issue saw."""
    assert misfits("tiny-sd3", ["a red fox"]) == [
        "clip_l keeps 8 of 11 tokens of 'a red fox': dropped 'fox'",
        "clip_g keeps 8 of 11 tokens of 'a red fox': dropped 'fox'",
        "t5 keeps 8 of 10 tokens of 'a red fox': dropped 'ox'"]
    assert misfits("digits-sd3", ["a red 7 on the left"]) == []
    assert any("does not know a word" in m for m in misfits("digits-sd3", ["a red fox"]))
    assert any("keeps 8 of 9" in m for m in misfits("digits-sd3", ["a red 7 on the far left"]))


@pytest.mark.parametrize("model", ["tiny-sd3", "digits-sd3"])
def test_bench_serve_uses_prompts_that_fit_its_model(model):
    assert misfits(model, calibration_prompts(model, None, 4)) == []


def test_the_engines_readme_states_the_current_schema_version_everywhere():
    from onex_export.contract import SCHEMA_VERSION

    text = (ROOT / "engines" / "README.md").read_text()
    stated = re.findall(r"schema version (\d+)|`schema_version` == (\d+)|`\"onex-export/build-manifest\"`, `(\d+)`", text)
    assert len(stated) == 3 and {int(next(v for v in s if v)) for s in stated} == {SCHEMA_VERSION}
