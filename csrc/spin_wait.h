// A spin-wait loop's pause, shared by the thread pool and parallel sessions.
#pragma once

namespace lwk {
namespace detail {

// Tells the core that this thread is spinning (x86 pause, AArch64 yield): it yields issue slots
// to the other hardware thread and keeps the loop from flooding the memory system.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace detail
}  // namespace lwk
