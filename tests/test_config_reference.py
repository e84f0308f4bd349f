"""The config reference is generated from the typed config: every field documents itself, and the
README's table is what the generator writes (no Ray, no files outside tmp_path)."""

import pytest
from pydantic import BaseModel

from pipeline.config import Config, ConfigError, reference

from conftest import REPO


def test_readme_config_reference_is_current():
    problem = reference.check(REPO / "README.md")
    assert problem is None, problem  # "README config reference is out of date: run `pipeline config-reference --write README.md`"


def _sections(model: type[BaseModel]):
    yield model
    for info in model.model_fields.values():
        for candidate in (reference._section(info.annotation)[0], reference._dict_entry(info.annotation)):
            if candidate is not None:
                yield from _sections(candidate)


def test_every_field_and_section_says_what_it_means():
    missing = [f"{model.__name__}.{name}" for model in _sections(Config) for name, info in model.model_fields.items()
               if not info.description and reference._section(info.annotation)[0] is None]
    assert not missing, f"fields without a docstring (their meaning in the config reference): {missing}"
    undocumented = [model.__name__ for model in _sections(Config) if not reference.doc(model.__doc__)]
    assert not undocumented, f"sections without a class docstring: {undocumented}"


def test_rows_show_defaults_choices_bounds_and_nested_sections():
    rows = {row.path: row for row in reference.rows()}
    assert rows["model.source"].default == "(required)" and rows["data.path"].default == "(required)"
    assert rows["model"].default == "(required)" and rows["train"].default == ""
    assert rows["model.lora"].default == "none" and "switches it on" in rows["model.lora"].meaning
    assert rows["model.lora.r"].default == "`8`"  # an optional section's fields are documented too
    assert rows["train.zero.offload_optimizer"].default == "`none`"  # the string, not an unset field
    assert rows["train.min_workers"].default == "none"
    assert rows["train.betas"].default == "`[0.9, 0.95]`" and rows["ray.resources"].default == "`{}`"
    assert rows["data.prompt_template"].default.startswith('`"### Instruction:\\n')
    assert "Allowed: ≥ 0, ≤ 3." in rows["train.zero_stage"].meaning
    assert "Allowed: `none`, `cpu`, `nvme`." in rows["train.zero.offload_params"].meaning
    assert "Allowed" not in rows["data.split.rule"].meaning  # its description names every choice already
    assert "`type` (required)" in rows["sweep.space"].meaning and "`with_zero` (`false`)" in rows["sweep.space"].meaning
    assert "sweep.confirm.seeds" in rows and "sweep.space.type" not in rows


def test_one_section_and_unknown_sections():
    lines = reference.table("train.zero").splitlines()
    assert lines[0] == "| field | default | meaning |"
    assert all(line.startswith("| `train.zero") for line in lines[2:]) and len(lines) == 2 + 8
    assert "| `train.zero_stage` |" not in reference.table("train.zero")  # a prefix of the name is not the section
    with pytest.raises(ConfigError, match="no section 'trian'; the sections are model, data, train"):
        reference.table("trian")


def test_write_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{reference.START}\n| old | table |\n{reference.END}\n\nafter\n")
    assert reference.check(readme) == "README config reference is out of date: run `pipeline config-reference --write README.md`"
    assert reference.write(readme) is True
    assert reference.check(readme) is None and reference.write(readme) is False
    text = readme.read_text()
    assert text.startswith("# intro\n\n") and text.endswith(f"{reference.END}\n\nafter\n") and "| old |" not in text
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no config reference block"):
        reference.check(readme)
