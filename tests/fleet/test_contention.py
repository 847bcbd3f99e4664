"""Contention: a latency-critical and a bulk plan on one shared medium, in one testbed run.

With the coordinator's token-bucket pacing the doorbell camera meets its SLO; with pacing
switched off (``SetPacing``, the product's own switch) the bulk job's TCP queue on the shared
``tbf`` makes it miss. A shorter run of ``doramesh bench fleet --contention`` (see
``doramesh.bench.contention`` for the setting and why it is plausible).
"""

from __future__ import annotations

import pytest

from doramesh.bench.contention import Setting, run

#: Paced, the camera must meet its SLO on nearly every frame; unpaced, clearly fewer. Seen on
#: two cores (30 frames a phase): at the 200 ms SLO paced 1.00, unpaced 0.67 (load 1.4); at a
#: 225 ms SLO paced 0.90-1.00 (misses were compute spikes of the loaded host, not the medium),
#: unpaced 0.47-0.90 (loads 3.5-5.9).
MIN_PACED = 0.85
MIN_GAP = 0.25


@pytest.mark.timeout(600)
def test_pacing_keeps_the_critical_plan_within_its_slo_and_unpaced_does_not() -> None:
    result = run(Setting(frames=16))
    paced, unpaced = result["slo_attainment_paced"], result["slo_attainment_unpaced"]
    assert paced >= MIN_PACED, result
    assert unpaced <= paced - MIN_GAP, result
    # The unpaced frames lost their time on the medium (the tail of the non-compute part).
    assert result["unpaced"]["network_ms_p95"] > result["paced"]["network_ms_p95"], result
    # Paced, the bulk job still moves: the camera's protection does not starve it.
    assert result["paced"]["bulk_photos"] > 0, result
