"""Peak-memory readings from /proc for the benchmarks (Linux only)."""


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak resident set) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
