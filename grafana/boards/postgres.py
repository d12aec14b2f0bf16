"""The PostgreSQL dashboard: activity, throughput, sizes, replication, statements, tables."""

from __future__ import annotations

from dashboard import Dashboard, Row, query_variable
from panels import stat, table, timeseries, up_stat
from promql import hit_ratio, rate, selector

# The databases chosen in the dashboard's Database variable.
DATABASES = 'datname=~"$datname"'


def in_databases(metric: str) -> str:
    """The metric's series in the databases chosen in the Database variable."""
    return selector(metric, DATABASES)


def with_statement_text(counter: str) -> str:
    """Per-statement rate of counter, labelled with the statement text from statement_info."""
    return (f"sum by (instance, queryid) ({rate(counter)})\n"
            f"* on (instance, queryid) group_left (query)\n"
            f"max by (instance, queryid, query) "
            f"({selector('qatoolbox_postgres_statement_info')})")


def dashboard() -> Dashboard:
    """Connections, slow queries, locks, transactions, cache, sizes, checkpoints,
    replication, statements and table health of one server."""
    return Dashboard("qatoolbox-postgres", "QAToolBox / PostgreSQL",
                     "Connections, slow queries, locks, transactions, cache, sizes, "
                     "checkpoints, replication, statements and table health.", [
        Row("Server"),
        up_stat("Up", "1 when the exporter's last PostgreSQL query succeeded.",
                [(selector("qatoolbox_postgres_up"), "{{server}}")]),
        stat("Version", "Server version.", "none",
             [(selector("qatoolbox_postgres_version_info"), "{{version}}")], text_mode="name",
             graph=False),
        stat("Uptime", "Time since the server started.", "s",
             [(f"time() - {selector('qatoolbox_postgres_start_time_seconds')}", "{{server}}")],
             graph=False),
        stat("In recovery", "1 on a replica (or while recovering), 0 on a primary.", "none",
             [(selector("qatoolbox_postgres_in_recovery"), "{{server}}")], graph=False,
             mappings=[{"type": "value", "options": {"0": {"text": "primary", "index": 0},
                                                     "1": {"text": "replica", "index": 1}}}]),
        stat("Tables", "User tables in the connected database.", "short",
             [(selector("qatoolbox_postgres_tables"), "{{server}}")], graph=False),
        stat("Databases size", "Sum of the selected databases' sizes.", "bytes",
             [(f"sum({in_databases('qatoolbox_postgres_database_size_bytes')})", "size")]),
        Row("Activity"),
        timeseries("Connections by state", "Client backends by state, against max_connections.",
                   "short",
                   [(f"sum by (state) ({in_databases('qatoolbox_postgres_connections')})",
                     "{{state}}"),
                    (f"max({selector('qatoolbox_postgres_max_connections')})", "max_connections")],
                   w=12, overrides=[{"matcher": {"id": "byName", "options": "max_connections"},
                                     "properties": [
                                         {"id": "custom.lineStyle",
                                          "value": {"fill": "dash", "dash": [10, 10]}},
                                         {"id": "color", "value": {"mode": "fixed",
                                                                   "fixedColor": "red"}}]}]),
        timeseries("Connection slots used", "Client connections over max_connections less "
                   "the reserved slots (PostgresTooManyConnections at 80%, "
                   "PostgresConnectionsExhausted at 95%).", "percentunit",
                   [(selector("instance:qatoolbox_postgres_connections_used:ratio"),
                     "{{server}}")], w=12, min_=0, max_=1, alert_lines=(0.80, 0.95)),
        timeseries("Slow queries and lock waits",
                   "Active queries older than the slow threshold, backends waiting on a lock.",
                   "short",
                   [(f"sum by (datname) ({in_databases('qatoolbox_postgres_slow_queries')})",
                     "{{datname}} slow"),
                    (f"sum by (datname) ({in_databases('qatoolbox_postgres_lock_waits')})",
                     "{{datname}} lock waits")], w=12),
        timeseries("Transaction ID age", "age(datfrozenxid) per database: autovacuum freezes "
                   "at 200 million; PostgresXidWraparound at 1 billion; writes stop near 2.1 "
                   "billion.", "short",
                   [(selector("qatoolbox_postgres_database_xid_age"), "{{datname}}")], w=12,
                   alert_lines=(1e9,)),
        timeseries("Longest query and transaction",
                   "Age of the longest running query, the oldest transaction and the oldest "
                   "idle-in-transaction session.", "s",
                   [(f"max by (datname) "
                     f"({in_databases('qatoolbox_postgres_longest_query_seconds')})",
                     "{{datname}} query"),
                    (f"max by (datname) "
                     f"({in_databases('qatoolbox_postgres_oldest_transaction_seconds')})",
                     "{{datname}} transaction"),
                    (f"max by (datname) ("
                     f"{in_databases('qatoolbox_postgres_oldest_idle_in_transaction_seconds')})",
                     "{{datname}} idle in transaction")], w=12),
        timeseries("Locks by mode", "Locks held or awaited, by mode.", "short",
                   [(f"sum by (mode) ({in_databases('qatoolbox_postgres_locks')})",
                     "{{mode}}")],
                   w=12),
        Row("Throughput"),
        timeseries("Transactions", "Commits and rollbacks per second.", "ops",
                   [(f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_transactions_committed_total', DATABASES)})",
                     "{{datname}} commit"),
                    (f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_transactions_rolled_back_total', DATABASES)})",
                     "{{datname}} rollback")], w=8),
        timeseries("Cache hit ratio", "Share of block reads served from shared buffers.",
                   "percentunit",
                   [(hit_ratio("qatoolbox_postgres_blocks_hit_total",
                               "qatoolbox_postgres_blocks_read_total", "datname", DATABASES),
                     "{{datname}}")], w=8, max_=1),
        timeseries("Rows", "Rows returned, fetched, inserted, updated and deleted per second.",
                   "ops",
                   [(f"sum({rate(counter, DATABASES)})", legend) for counter, legend in (
                       ("qatoolbox_postgres_rows_returned_total", "returned"),
                       ("qatoolbox_postgres_rows_fetched_total", "fetched"),
                       ("qatoolbox_postgres_rows_inserted_total", "inserted"),
                       ("qatoolbox_postgres_rows_updated_total", "updated"),
                       ("qatoolbox_postgres_rows_deleted_total", "deleted"))], w=8),
        timeseries("Deadlocks and conflicts", "Deadlocks and recovery conflicts per interval.",
                   "short",
                   [(f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_deadlocks_total', DATABASES, 'increase')})",
                     "{{datname}} deadlocks"),
                    (f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_conflicts_total', DATABASES, 'increase')})",
                     "{{datname}} conflicts")], w=8),
        timeseries("Temporary files", "Bytes written to temporary files per second (sorts and "
                   "hashes that did not fit work_mem).", "Bps",
                   [(f"sum by (datname) ({rate('qatoolbox_postgres_temp_bytes_total', DATABASES)})",
                     "{{datname}}")], w=8),
        timeseries("Database sizes", "Size of each database.", "bytes",
                   [(in_databases("qatoolbox_postgres_database_size_bytes"), "{{datname}}")], w=8),
        Row("Checkpoints and replication"),
        timeseries("Checkpoints", "Scheduled and requested checkpoints per interval.", "short",
                   [(rate("qatoolbox_postgres_checkpoints_timed_total", function="increase"),
                     "timed"),
                    (rate("qatoolbox_postgres_checkpoints_requested_total", function="increase"),
                     "requested")], w=6),
        timeseries("Buffers written", "Buffers written per second, by writer.", "ops",
                   [(f"sum by (by) ({rate('qatoolbox_postgres_buffers_written_total')})",
                     "{{by}}")], w=6),
        timeseries("Replication lag", "Replay lag on a replica (seconds), and each replica's "
                   "lag seen from the primary (bytes).", "s",
                   [(selector("qatoolbox_postgres_replication_lag_seconds"), "replica lag"),
                    (selector("qatoolbox_postgres_replica_lag_bytes"),
                     "{{application_name}} bytes")],
                   w=6, overrides=[{"matcher": {"id": "byRegexp", "options": ".* bytes"},
                                    "properties": [{"id": "unit", "value": "bytes"}]}]),
        timeseries("Replication slots", "WAL retained by each replication slot.", "bytes",
                   [(selector("qatoolbox_postgres_replication_slot_retained_bytes"),
                     "{{slot_name}}")], w=6),
        Row("Statements and tables"),
        table("Top statements", "Statements by execution time per second, i.e. the "
              "average number of backends busy running each (1 = one backend all the time), "
              "with calls and rows per second (pg_stat_statements, the exporter's top N).",
              "short",
              [(with_statement_text("qatoolbox_postgres_statement_seconds_total"), ""),
               (with_statement_text("qatoolbox_postgres_statement_calls_total"), ""),
               (with_statement_text("qatoolbox_postgres_statement_rows_total"), "")],
              h=9, columns={"A": "busy backends", "B": "calls/s", "C": "rows/s"},
              units={"calls/s": "ops", "rows/s": "ops"}, sort_by="busy backends"),
        table("Table health", "Dead rows, size and time since the last autovacuum and "
              "autoanalyze of the largest tables.", "short",
              [(selector("qatoolbox_postgres_table_dead_rows"), ""),
               (selector("qatoolbox_postgres_table_live_rows"), ""),
               (selector("qatoolbox_postgres_table_size_bytes"), ""),
               (f"time() - "
                f"{selector('qatoolbox_postgres_table_last_autovacuum_timestamp_seconds')}", ""),
               (f"time() - "
                f"{selector('qatoolbox_postgres_table_last_autoanalyze_timestamp_seconds')}", "")],
              h=9, columns={"A": "dead rows", "B": "live rows", "C": "size",
                            "D": "since autovacuum", "E": "since autoanalyze"},
              units={"size": "bytes", "since autovacuum": "s", "since autoanalyze": "s"},
              sort_by="dead rows"),
        timeseries("Sequential vs index scans", "Scans per second of the busiest tables.",
                   "ops",
                   [(f"topk(5, sum by (schema, table) "
                     f"({rate('qatoolbox_postgres_table_seq_scans_total')}))",
                     "{{schema}}.{{table}} seq"),
                    (f"topk(5, sum by (schema, table) "
                     f"({rate('qatoolbox_postgres_table_index_scans_total')}))",
                     "{{schema}}.{{table}} index")], w=24),
    ], [query_variable("datname", "Database",
                       'label_values(qatoolbox_postgres_database_size_bytes{job=~"$job",'
                       'instance=~"$instance"}, datname)')])
