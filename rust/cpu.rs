//! What the processor running this process can do, detected at run time.
//!
//! The hot loops (resampling, dot products) are compiled for a baseline target
//! and pick wider SIMD paths at run time; this module names the widest level
//! available so `starkret doctor` and the benchmarks can report it. It also owns the
//! worker thread pools the batch functions run on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The widest SIMD instruction set this CPU supports, as a short name.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
        if std::arch::is_x86_feature_detected!("sse4.1") {
            return "sse4.1";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("sve") {
            return "sve";
        }
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// A rayon pool with `threads` workers, created once per distinct size and reused:
/// building a pool per call would cost more than preprocessing a small batch.
pub fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, String> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let threads = if threads == 0 {
        available_threads()
    } else {
        threads
    };
    let pools = POOLS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut pools = pools
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(pool) = pools.get(&threads) {
        return Ok(pool.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("starkret-{i}"))
        .build()
        .map_err(|e| format!("cannot start {threads} worker threads: {e}"))?;
    let pool = Arc::new(pool);
    pools.insert(threads, pool.clone());
    Ok(pool)
}

/// Asks the kernel to back `buf` with transparent huge pages where it can. A batch's
/// output is fresh memory written once; with 4 KiB pages every page costs a fault
/// (about as long as preprocessing the pixels that fill it), with 2 MiB pages almost
/// none does. Only a hint: nothing changes where the kernel declines.
pub fn prefer_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < 2 * HUGE {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let first = start.next_multiple_of(PAGE);
        let end = (start + bytes) / PAGE * PAGE;
        // SAFETY: [first, end) lies inside `buf`, which this function borrows
        // mutably, and MADV_HUGEPAGE only changes how pages are backed, never their
        // contents; a failure leaves the memory as it was.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
}

/// Number of logical CPUs usable by this process (at least 1).
pub fn available_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_level_is_a_known_name() {
        let known = [
            "avx512", "avx2+fma", "sse4.1", "sse2", "sve", "neon", "scalar",
        ];
        assert!(known.contains(&simd_level()));
    }

    #[test]
    fn at_least_one_thread_is_available() {
        assert!(available_threads() >= 1);
    }
}
