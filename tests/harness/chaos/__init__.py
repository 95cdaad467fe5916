"""The chaos suite's machinery, shared by ``tests/integration/chaos`` (pytest) and ``prefsync bench chaos``:
the world (:mod:`.world`), the workload (:mod:`.workload`), the faults (:mod:`.faults`), the
history (:mod:`.history`), the checker (:mod:`.checker`) and a case end to end (:mod:`.run`)."""
