"""Contention: a latency-critical and a bulk plan on one shared medium, in one testbed run.

With the coordinator's token-bucket pacing the doorbell camera meets its SLO; with pacing
switched off (``SetPacing``, the product's own switch) the bulk job's TCP queue on the shared
``tbf`` can make it miss, but not reliably (see the test's docstring). A shorter run of
``doramesh bench fleet --contention`` (see ``doramesh.bench.contention`` for the setting and
why it is plausible).
"""

from __future__ import annotations

import pytest

from doramesh.bench.contention import Setting, run

#: Paced, the camera must meet its SLO on nearly every frame. Seen on two cores (30 frames a
#: phase): at the 200 ms SLO paced 1.00 (load 1.4); at a 225 ms SLO paced 0.90-1.00 (misses were
#: compute spikes of the loaded host, not the medium).
MIN_PACED = 0.85


@pytest.mark.timeout(600)
def test_pacing_keeps_the_critical_plan_within_its_slo_next_to_a_bulk_job() -> None:
    """Both phases run in one testbed; only the paced phase has a promise to keep.

    The unpaced phase's attainment is measured and reported (the bench prints it) but not
    asserted: it ranged from 0.47 to 1.00 between runs (1.00 on a quiet fresh-clone CI run),
    because gRPC's flow control bounds the bulk stream's queue on the medium. Making the
    unpaced miss reliable is open work (issue 5), not something this test pretends.
    """
    result = run(Setting(frames=16))
    paced, unpaced = result["slo_attainment_paced"], result["slo_attainment_unpaced"]
    assert paced >= MIN_PACED, result
    assert 0.0 <= unpaced <= 1.0 and result["unpaced"]["frames"] == 16, result
    # The scheduler protected the camera: the bulk flow was held below what the medium
    # leaves after the camera's frames, in small bursts.
    bulk = result["scheduled"]["bulk_flow"]
    assert 0 < bulk["rate_mbps"] < result["setting"]["medium_mbps"], result
    assert bulk["burst_kb"] <= 64.0 + 1e-6, result
    # Paced, the bulk job still moves: the camera's protection does not starve it.
    assert result["paced"]["bulk_photos"] > 0, result
