-- Runs once when the compose stack creates its PostgreSQL volume: the statistics the
-- exporter's top-statements family reads (the server preloads the library, see the compose file).
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
