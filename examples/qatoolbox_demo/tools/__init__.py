"""The demo's tools app: QAToolBox's chat, presence and time capsule tables."""
