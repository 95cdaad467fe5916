"""Operations: metrics, logs, health endpoints and failpoints."""
