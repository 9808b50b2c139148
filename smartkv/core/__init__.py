"""The pure core: group-wise quantization and bit packing, SmartKV's importance statistics and bit policy, true-byte
accounting, the name registry. Imports torch and numpy only, nothing else of smartkv outside core."""
