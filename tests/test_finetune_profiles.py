"""The fine-tuning profiles (issue 16 item 2): every registered attack and defense resolves under
cpu-small-ft and paper-ft, passes the defense's run checks, and on cpu-small-ft passes every check
made before training; the profiles start from their models."""
import pytest

from poisonbench.config import get_profile, resolve
from poisonbench.grid import validate
from poisonbench.registry import ATTACKS, DEFENSES, build_params

ATTACK_NAMES = sorted(ATTACKS.names())
DEFENSE_NAMES = sorted(DEFENSES.names())


@pytest.mark.parametrize("profile", ["cpu-small-ft", "paper-ft"])
def test_every_attack_and_defense_resolves_and_fits_the_fine_tuning_schedule(profile):
    for defense in DEFENSE_NAMES:
        cfg = resolve("badnet", defense, profile)
        cls = DEFENSES.get(defense)
        cls(build_params(cls.Params, cfg.defense_params, defense), 0).check_run(cfg)
    for attack in ATTACK_NAMES:
        assert resolve(attack, "clip", profile).init == get_profile(profile).init


def test_the_fine_tuning_profiles_start_from_a_model():
    assert resolve("badnet", "clip", "cpu-small-ft").init == "clean"
    assert get_profile("cpu-small-ft").pretrain == "cpu-small"
    assert resolve("badnet", "clip", "paper-ft").init == "pretrained:RN50/openai"
    assert resolve("badclip", "clip", "paper-ft").attack_params["surrogate"] == "pretrained:RN50/openai"
    assert resolve("badnet", "clip", "cpu-small").init == "scratch"  # pre-training profiles are unchanged


def test_every_cpu_small_ft_cell_passes_the_checks_made_before_training():
    cfgs = [resolve(a, d, "cpu-small-ft") for a in ATTACK_NAMES for d in DEFENSE_NAMES]
    assert validate(cfgs, "cpu") == []
