/// jemalloc instead of glibc's malloc for the node: measured +20% closed-loop throughput for
/// ~10 MiB more peak RSS (docs/BENCHMARKS.md, 2026-12-04). sled's copy-on-write leaves and the
/// overlay's batches allocate and free many small buffers across threads; glibc spent ~20%
/// of all CPU in `_int_malloc`, `unlink_chunk` and `malloc_consolidate` on them.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    habar_broker::cli::main()
}
