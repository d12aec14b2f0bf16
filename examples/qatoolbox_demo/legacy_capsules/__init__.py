"""Time capsules as QAToolBox had them before its tools migration 0070: optional, off by default.

Turned on with QATOOLBOX_DEMO_LEGACY_CAPSULES=1 (demo/settings.py), it gives the database the
tools_timecapsule table an older deployment still has, so both shapes can be exercised.
"""
