"""Operations report and raw export from Prometheus' HTTP API; never imported when serving."""
