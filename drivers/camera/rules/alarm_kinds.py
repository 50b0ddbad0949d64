"""The alarms the camera's falls and thrown-object rules raise, declared in the capability's spec
(``CapabilitySpec.alarm_kinds``). Both are about a place (a lobby, a façade), seen by a camera.

Shipped policies (a site's ``alarms.policies.<kind>`` replaces them): a fall in a common area is critical and
escalates on the main ladder like a wristband fall, without a siren of its own (the guard room is told; a
siren in a lobby helps nobody on the floor); an object thrown from height is high: nobody may be hurt, but
the guard room should look at the clip and the window at once.
"""

from __future__ import annotations

from typing import Final

from edgeagent.kernel.alarms.kinds import AlarmKindSpec, KindPolicy

VIDEO_FALL: Final = "video_fall"
THROWN_OBJECT: Final = "thrown_object"

CAMERA_RULE_ALARM_KINDS: Final[tuple[AlarmKindSpec, ...]] = (
    AlarmKindSpec(VIDEO_FALL, "A person fell (camera)",
                  KindPolicy("critical", repeat_s=60, escalate_after_s=(120, 300)), subject="place"),
    AlarmKindSpec(THROWN_OBJECT, "Object thrown from height (camera)",
                  KindPolicy("high", repeat_s=300, escalate_after_s=(600,)), subject="place"),
)
