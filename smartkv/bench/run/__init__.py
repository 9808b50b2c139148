"""How jobs run: `worker` runs one job in-process (never imports ray), `generation` is its prefill/decode loop,
`runner` and `executor` spread jobs over Ray actors (the only place that imports ray)."""
