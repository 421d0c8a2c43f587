// Compiler hints shared by the kernel headers (kernel_*.h, train_impl.h): one spelling each,
// empty where the compiler has no equivalent.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define LWK_INLINE inline __attribute__((always_inline))
#define LWK_NOINLINE __attribute__((noinline))
#define LWK_RESTRICT __restrict__
#else
#define LWK_INLINE inline
#define LWK_NOINLINE
#define LWK_RESTRICT
#endif

// Marks a loop body as opaque to the compiler's idiom recognition: short zero-fill and copy loops
// must stay inline vector stores, not become memset/memcpy calls (each call costs more than the
// loop, plus a vzeroupper on x86).
#if defined(__GNUC__) || defined(__clang__)
#define LWK_NO_IDIOM() __asm__ __volatile__("" ::: "memory")
#else
#define LWK_NO_IDIOM() ((void)0)
#endif

#if defined(__clang__)
#define LWK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LWK_UNROLL _Pragma("GCC unroll 16")
#else
#define LWK_UNROLL
#endif

// Asks for the cache line at `p` ahead of its use (a read, kept in all levels).
#if defined(__GNUC__) || defined(__clang__)
#define LWK_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define LWK_PREFETCH(p) ((void)(p))
#endif
