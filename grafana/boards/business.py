"""The Business dashboard: QAToolBox's own figures (users, chat, time capsules) and the
stalled-job indicators."""

from __future__ import annotations

from dashboard import Dashboard, Row
from panels import bargauge, stat, table, threshold_steps, timeseries
from promql import rate, selector

# These three are the Overview's too.
ONLINE_HELP = ("Users online now: status online or the online flag set, and seen within the "
               "presence window (business.presence_window, 5 min).")
CLEANUP_HELP = ("Chat rooms with no message and no activity for longer than QAToolBox's cleanup "
                "age plus a grace (12 h + 1 h): 0 while the cleanup (every 30 min) runs.")
NO_CAPSULES = "No time capsules in this deployment"
APPLICABLE_MAPPING = [{"type": "value", "options": {
    "0": {"text": "not in this deployment", "color": "text", "index": 0},
    "1": {"text": "counted", "color": "green", "index": 1}}}]


def dashboard() -> Dashboard:
    """Users, chat rooms, messages, time capsules and stalled jobs."""
    capsule_query = 'query="qatoolbox_time_capsules"'
    return Dashboard("qatoolbox-business", "QAToolBox / Business",
                     "Users, chat rooms, messages, time capsules and stalled jobs.", [
        Row("Users"),
        stat("Registered users", "Accounts in auth_user.", "short",
             [(f"sum({selector('qatoolbox_users')})", "users")]),
        stat("Online users", ONLINE_HELP, "short",
             [(f"sum({selector('qatoolbox_users_online')})", "online")]),
        bargauge("Active users by window", "Users who logged in within each window.", "short",
                 [(f"sum by (window) ({selector('qatoolbox_users_active')})", "{{window}}")], w=8,
                 h=4),
        bargauge("Users by status",
                 "Presence rows by status; online as in Online users, not seen within the "
                 "presence window as offline, statuses the clients sent beyond the known ones "
                 "as they are (at most 20, the rest as other).", "short",
                 [(f"sum by (status) ({selector('qatoolbox_users_by_status')})", "{{status}}")],
                 w=8, h=4),
        timeseries("Accounts", "Active and inactive accounts.", "short",
                   [(f"sum by (state) ({selector('qatoolbox_users')})", "{{state}}")], w=12,
                   stack=True),
        timeseries("Active users", "Users who logged in within each window.", "short",
                   [(f"sum by (window) ({selector('qatoolbox_users_active')})", "{{window}}")],
                   w=12),
        Row("Chat"),
        timeseries("Chat rooms by type", "Rooms by room type.", "short",
                   [(f"sum by (room_type) ({selector('qatoolbox_chat_rooms')})", "{{room_type}}")],
                   stack=True),
        timeseries("Chat rooms by status",
                   "Rooms by status, expired included (QAToolBox's expiry task sets it).",
                   "short",
                   [(f"sum by (status) ({selector('qatoolbox_chat_rooms')})", "{{status}}")],
                   stack=True),
        timeseries("Messages per minute",
                   "Messages sent per minute, by type (voice messages are audio), from a "
                   "counter the cleanup's deletes do not lower.", "short",
                   [(f"sum by (message_type) ({rate('qatoolbox_chat_messages_total')}) * 60",
                     "{{message_type}}")], stack=True),
        timeseries("Messages stored",
                   "Messages in the table now, by type: the cleanup deletes idle rooms' "
                   "messages, so this goes down as well as up.", "short",
                   [(f"sum by (message_type) ({selector('qatoolbox_chat_messages_stored')})",
                     "{{message_type}}")], w=12, stack=True),
        stat("Messages in the last hour", "Messages created in the last hour.", "short",
             [(f"sum({selector('qatoolbox_chat_messages_last_hour')})", "last hour")], w=12),
        Row("Time capsules"),
        stat("Time capsules here",
             "Whether this deployment has time capsules: QAToolBox's tools migration 0070 "
             "dropped them, so at HEAD the capsule queries do not apply and the panels on the "
             "right stay empty.", "short",
             [(f"max({selector('qatoolbox_business_query_applicable', capsule_query)})",
               "capsules")],
             w=6, h=8, mappings=APPLICABLE_MAPPING, graph=False, no_value="not known yet"),
        timeseries("Time capsules", "Capsules by type and state (state from is_unlocked).",
                   "short",
                   [(f"sum by (capsule_type, state) ({selector('qatoolbox_time_capsules')})",
                     "{{capsule_type}} {{state}}")], w=12, stack=True, no_value=NO_CAPSULES),
        stat("Overdue time capsules",
             "Capsules past their unlock time by over an hour, not unlocked (unlock stalled).",
             "short", [(f"sum({selector('qatoolbox_time_capsules_overdue')})", "overdue")],
             w=6, h=8, thresholds=threshold_steps((None, "green"), (1, "orange")),
             no_value=NO_CAPSULES),
        Row("Stalled jobs and queries"),
        timeseries("Chat rooms past cleanup", CLEANUP_HELP, "short",
                   [(f"sum({selector('qatoolbox_chat_rooms_cleanup_overdue')})", "past cleanup")],
                   w=12, alert_lines=(1,)),
        table("Business queries that apply here",
              "1: the tables and columns a query reads exist and it runs; 0: they do not "
              "(not run, not failing).", "short",
              [(f"max by (query) ({selector('qatoolbox_business_query_applicable')})", "")],
              w=12, columns={"A": "applicable"}),
        timeseries("Business queries failing", "Business queries whose last run failed.",
                   "short",
                   [(f"count({selector('qatoolbox_business_query_success')} == 0) or vector(0)",
                     "failing")], w=8),
        timeseries("Query age", "Time since each business query last succeeded.", "s",
                   [(f"time() - "
                     f"{selector('qatoolbox_business_query_last_success_timestamp_seconds')}",
                     "{{query}}")], w=8),
        timeseries("Query duration", "Time each business query took on its last run.", "s",
                   [(selector("qatoolbox_business_query_duration_seconds"), "{{query}}")], w=8),
    ])
