"""The alarms a wristband raises, declared in the capability's spec (``CapabilitySpec.alarm_kinds``).

Each is about a resident; the shipped policies below are what a site gets unless its
``alarms.policies.<kind>`` says otherwise. Escalation runs on the site's main ladder (``alarms.levels``).
"""

from __future__ import annotations

import enum
from typing import Final

from edgeagent.kernel.alarms.kinds import SIREN, STROBE, AlarmKindSpec, KindPolicy


class AlarmKind(enum.StrEnum):
    SOS = "sos"
    FALL = "fall"
    HEART_RATE_HIGH = "heart_rate_high"
    HEART_RATE_LOW = "heart_rate_low"
    SPO2_LOW = "spo2_low"
    REMOVED = "removed"
    LOW_BATTERY = "low_battery"
    NO_SIGNAL = "no_signal"
    LEFT_COMPOUND = "left_compound"


_LOUD: Final = (SIREN, STROBE)

WRISTBAND_ALARM_KINDS: Final[tuple[AlarmKindSpec, ...]] = (
    AlarmKindSpec(AlarmKind.SOS, "SOS button pressed",
                  KindPolicy("critical", _LOUD, repeat_s=30, escalate_after_s=(120, 300))),
    AlarmKindSpec(AlarmKind.FALL, "Fall detected",
                  KindPolicy("critical", _LOUD, repeat_s=30, escalate_after_s=(120, 300))),
    AlarmKindSpec(AlarmKind.HEART_RATE_HIGH, "Heart rate too high",
                  KindPolicy("high", (STROBE,), repeat_s=60, escalate_after_s=(300, 900))),
    AlarmKindSpec(AlarmKind.HEART_RATE_LOW, "Heart rate too low",
                  KindPolicy("high", (STROBE,), repeat_s=60, escalate_after_s=(300, 900))),
    AlarmKindSpec(AlarmKind.SPO2_LOW, "Blood oxygen (SpO2) low",
                  KindPolicy("high", (STROBE,), repeat_s=60, escalate_after_s=(300, 900))),
    AlarmKindSpec(AlarmKind.REMOVED, "Wristband taken off",
                  KindPolicy("medium", repeat_s=600, escalate_after_s=(1800,))),
    AlarmKindSpec(AlarmKind.LOW_BATTERY, "Wristband battery low",
                  KindPolicy("low", repeat_s=3600, fold_window_s=12 * 3600.0)),
    AlarmKindSpec(AlarmKind.NO_SIGNAL, "No signal from wristband",
                  KindPolicy("medium", repeat_s=900, escalate_after_s=(3600,))),
    AlarmKindSpec(AlarmKind.LEFT_COMPOUND, "Left the compound",
                  KindPolicy("high", (STROBE,), repeat_s=120, escalate_after_s=(600, 1800))),
)
