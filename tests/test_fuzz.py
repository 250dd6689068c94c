"""Fuzz suite, bounded profile: generated models either raise a SparseccError or equal prune's reference.

The grammar is :mod:`tests.fuzz_grammar`; the long profile with its counts is ``benchmarks/fuzz.py``
(``make fuzz``).
"""

from hypothesis import HealthCheck, given, settings

from tests.fuzz_grammar import check, specs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(spec=specs())
def test_generated_models_compile_to_prunes_reference_or_raise_a_sparsecc_error(spec):
    outcome, detail = check(spec)
    assert outcome != "mismatch", f"{spec}: {detail}"
    OUTCOMES.append(outcome)


OUTCOMES: list = []


def test_the_bounded_profile_ran_sparse_kernels():
    # runs after the property (file order): the suite must not pass by keeping every layer dense
    assert sum(o == "ok:sparse" for o in OUTCOMES) >= 10, OUTCOMES
