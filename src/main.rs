//! `gptbalance`: parse the command line and run the subcommand; all the work
//! lives in the library.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than the C library's allocator: a request allocates and
/// frees the same few dozen small blocks, often on different threads (a
/// usage row is made by a worker and freed by the usage writer). Measured
/// with `bench/`: about 9 % more requests/s and 9 % less CPU per request
/// at c=64 than glibc's malloc with its best settings, with the same RSS
/// idle, at peak and per idle stream once huge pages are off (below).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_transparent_huge_pages();
    gptbalance::cli::run(gptbalance::cli::Cli::parse())
}

/// Transparent huge pages only cost a proxy memory: its heap is small and
/// touched sparsely, and with them the first touch of a region brings in
/// 2 MiB at once. mimalloc is built not to ask for them (`no_thp`; with
/// them idle RSS was 19 MiB instead of 11, and 65 MiB instead of 41 with
/// 1,000 idle streams); this also keeps hosts whose kernel gives them
/// without asking ("always") from doing so to this process.
#[allow(unsafe_code)]
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process; it
    // takes no pointers. Failure (an old kernel) leaves the default.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
