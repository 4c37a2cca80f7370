
import pytest

from mammo_core.config import Params, load_params, parse_override
from mammo_core.errors import ParamsError
from tests.helpers.paths import REPO


@pytest.mark.parametrize("name", ["smoke", "default", "paper"])
def test_shipped_params_validate(name):
    params = load_params(REPO / "params" / f"{name}.yaml")
    assert isinstance(params, Params)
    assert params.run.name == name


def test_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("curate:\n  max_sid: 512\n")
    with pytest.raises(ParamsError) as err:
        load_params(f)
    assert str(f) in str(err.value)
    assert "curate.max_sid: unknown key" in str(err.value)


def test_unknown_section_rejected(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("curat:\n  workers: 2\n")
    with pytest.raises(ParamsError, match="curat: unknown key"):
        load_params(f)


def test_bad_value_names_key(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("curate:\n  val_fraction: 0.9\n")
    with pytest.raises(ParamsError, match=r"curate\.val_fraction"):
        load_params(f)


def test_set_override_parsed_as_yaml_and_validated():
    p = load_params(REPO / "params" / "smoke.yaml", ["curate.workers=1", "data.image_shape=[256, 160]"])
    assert p.curate.workers == 1
    assert p.data.image_shape == (256, 160)
    with pytest.raises(ParamsError, match=r"--set curate.worker=3.*curate\.worker: unknown key"):
        load_params(REPO / "params" / "smoke.yaml", ["curate.worker=3"])


def test_override_syntax_errors():
    assert parse_override("a.b=null") == ("a.b", None)
    with pytest.raises(ParamsError, match="expected section.key=value"):
        parse_override("nonsense")
    with pytest.raises(ParamsError, match="expected section.key=value"):
        load_params(None, ["workers=3"])


def test_real_sources_need_a_root():
    with pytest.raises(ParamsError, match="data.root is required"):
        load_params(None, ["data.source=cbis-local"])


def test_missing_file_named(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["default", "paper"])
def test_the_branch_learning_rate_decays_within_the_configured_epochs(name):
    """A step decay scheduled after the last epoch is no schedule at all: the run trains at one lr."""
    from mammo_core.training.schedule import Schedule

    schedule = Schedule.from_params(load_params(REPO / "params" / f"{name}.yaml").train)
    after_warmup = [schedule.lr_at(e) for e in range(schedule.warmup_epochs, schedule.epochs)]
    assert after_warmup[0] == schedule.lr and min(after_warmup) <= schedule.lr / schedule.lr_gamma


# what params/paper_phantom.yaml may change from paper.yaml, each said in its header (issue 18, goal 7)
PHANTOM_CHANGES = {"run": {"name", "device"}, "data": {"source", "root", "n_patients", "image_shape", "seed",
                                                       "download_workers"},
                   "train": {"weights", "epochs", "warmup_epochs"}, "hashing": {"epochs"}, "classify": {"n_boot"},
                   "detect": {"epochs", "r50_weights", "n_boot"}, "baselines": {"weights", "n_boot"}}


def test_paper_phantom_keeps_every_size_of_paper():
    """The GPU check runs paper.yaml's sizes: any other difference would make it a check of something else."""
    paper = load_params(REPO / "params" / "paper.yaml").model_dump()
    phantom = load_params(REPO / "params" / "paper_phantom.yaml").model_dump()
    differing = {(section, key) for section, values in paper.items() for key, value in values.items()
                 if phantom[section][key] != value}
    allowed = {(section, key) for section, keys in PHANTOM_CHANGES.items() for key in keys}
    assert differing - allowed == set()
    assert ("train", "epochs") in differing and ("data", "source") in differing  # the comparison sees changes
    assert phantom["patches"]["size"] == 224 and phantom["detect"]["max_size"] == 1024
