"""Running aarch64 artifacts on an x86_64 machine under qemu user-mode emulation."""
