"""The benchmark kinds: one registry (lossaverse.pipeline.data.kinds) behind the config, the prompt
templates, the reference completions and the marker's graders."""

import pytest

from lossaverse.cluster.config import ConfigError, load_config
from lossaverse.pipeline.data.build import REFERENCE_FORMS
from lossaverse.pipeline.data.kinds import KINDS
from lossaverse.pipeline.data.prompts import TEMPLATES, render, template_for
from lossaverse.pipeline.marker.mark import GRADERS, grade_row
from tests.conftest import ROOT

ITEM = {"question": "What is 6 * 7?", "choices": ["41", "42"]}
REFERENCES = {"numeric": "42", "math": "42", "choice": "B", "exact": "42"}


def test_every_kind_has_a_template_a_reference_form_and_a_grader_and_nothing_else_does():
    assert set(GRADERS) == set(KINDS) == set(TEMPLATES) == set(REFERENCE_FORMS) == set(REFERENCES)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_kinds_reference_stated_in_its_own_form_is_marked_right(kind):
    """The form a kind's reference takes as a training completion is the one its grader reads."""
    completion = KINDS[kind].reference_form.format(reference=REFERENCES[kind])
    assert grade_row(completion, REFERENCES[kind], kind, choices=ITEM["choices"]).correct
    prompt = render({**ITEM, "kind": kind}, template_for(kind))
    assert prompt.startswith("Question: What is 6 * 7?") and prompt.endswith("Answer:")


def test_an_unknown_kind_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"benchmark.kind: unknown benchmark kind 'essay'; valid: \['choice', 'exact', 'math', 'numeric'\]"):
        load_config(ROOT / "configs" / "tiny.yaml", ["benchmark.kind=essay"])
    with pytest.raises(ValueError, match="unknown benchmark kind 'essay'"):
        template_for("essay")
    with pytest.raises(ValueError, match="unknown benchmark kind 'essay'"):
        grade_row("The answer is 1.", "1", "essay")
