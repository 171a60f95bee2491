"""The DuckDB schema of the flow store: the ``flows`` table (DESIGN's normalised record) and bookkeeping.

Bookkeeping tables live in the same database so that one DuckDB transaction commits the rows, the journal
cursor, the decoders' template caches and the loss counters together: after a crash the store resumes from
exactly the state its rows reflect, which is what makes ingest exactly once.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AGENT_STATS_COLUMNS",
    "DDL",
    "EXPORTER_STATS_COLUMNS",
    "FLOW_COLUMNS",
    "SCHEMA_VERSION",
]

#: 2: ``received`` is the gateway's receive time, ``agent_received`` (new) the agent's. A version 1 store is
#: migrated on open: its rows get ``agent_received = received`` (version 1 stored the agent's time there).
SCHEMA_VERSION: Final = 2

# (name, DuckDB type). The order is the table's column order; the receive times come last because they are
# ours, not the exporter's. ``received`` is when the gateway journaled the datagram, by the gateway's own
# clock: retention and "--since" act on it (falling back to it when an exporter's clock is wrong: a
# Raspberry Pi without RTC exports 1970 timestamps until NTP syncs), so an agent whose clock is hours off
# neither loses fresh flows to retention nor keeps old ones too long. ``agent_received`` is when the agent
# received the datagram, by the agent's clock (its skew is in the gateway's status).
FLOW_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("agent", "VARCHAR NOT NULL"),
    ("exporter", "VARCHAR NOT NULL"),
    ("version", "UTINYINT NOT NULL"),
    ("domain_id", "BIGINT"),
    ("flow_start", "TIMESTAMPTZ"),
    ("flow_end", "TIMESTAMPTZ"),
    ("src_addr", "VARCHAR"),
    ("dst_addr", "VARCHAR"),
    ("src_port", "INTEGER"),
    ("dst_port", "INTEGER"),
    ("protocol", "SMALLINT"),
    ("tcp_flags", "INTEGER"),
    ("packets", "UBIGINT"),
    ("bytes", "UBIGINT"),
    ("in_if", "BIGINT"),
    ("out_if", "BIGINT"),
    ("src_as", "BIGINT"),
    ("dst_as", "BIGINT"),
    ("next_hop", "VARCHAR"),
    ("tos", "SMALLINT"),
    ("sampling_interval", "BIGINT"),
    ("extra", "JSON"),
    ("received", "TIMESTAMPTZ NOT NULL"),
    ("agent_received", "TIMESTAMPTZ"),
)

# Per (agent, exporter): what the sink saw. Sequence figures are the decoder's (RFC semantics: v5 counts
# flows, v9 export packets, IPFIX data records) summed over observation domains; they measure loss between
# the exporter and the agent, which flowtunnel cannot prevent but must report.
EXPORTER_STATS_COLUMNS: Final[tuple[str, ...]] = (
    "agent", "exporter", "datagrams", "records", "options_records", "undecodable", "set_errors",
    "no_template_sets", "seq_expected", "seq_received", "seq_lost", "seq_resets", "last_version",
    "first_seen", "last_seen",
)

# Per agent: gaps in the agent's own datagram sequence numbers as they reach the store (transit loss, zero by
# design unless the agent's spool quota dropped datagrams: then it equals the agent's reported drops).
AGENT_STATS_COLUMNS: Final[tuple[str, ...]] = ("agent", "last_stream_seq", "datagrams", "transit_lost")

DDL: Final[tuple[str, ...]] = (
    "CREATE TABLE IF NOT EXISTS flows (" + ", ".join(f"{n} {t}" for n, t in FLOW_COLUMNS) + ")",
    "CREATE TABLE IF NOT EXISTS store_meta (key VARCHAR PRIMARY KEY, value BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS decoder_state (agent VARCHAR PRIMARY KEY, state BLOB NOT NULL)",
    """CREATE TABLE IF NOT EXISTS exporter_stats (
        agent VARCHAR NOT NULL, exporter VARCHAR NOT NULL,
        datagrams UBIGINT NOT NULL, records UBIGINT NOT NULL, options_records UBIGINT NOT NULL,
        undecodable UBIGINT NOT NULL, set_errors UBIGINT NOT NULL, no_template_sets UBIGINT NOT NULL,
        seq_expected UBIGINT NOT NULL, seq_received UBIGINT NOT NULL, seq_lost UBIGINT NOT NULL,
        seq_resets UBIGINT NOT NULL, last_version UTINYINT, first_seen TIMESTAMPTZ, last_seen TIMESTAMPTZ,
        PRIMARY KEY (agent, exporter))""",
    """CREATE TABLE IF NOT EXISTS agent_stats (
        agent VARCHAR PRIMARY KEY, last_stream_seq UBIGINT, datagrams UBIGINT NOT NULL,
        transit_lost UBIGINT NOT NULL)""",
)
