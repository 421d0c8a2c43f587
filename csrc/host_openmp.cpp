#include "host_openmp.h"

#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#if defined(__linux__) || defined(__FreeBSD__)
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#define LWK_FIND_HOST_OPENMP 1
#endif

namespace lwk {
namespace detail {
namespace {

// The two entry points used; both are part of libgomp's ABI since GCC 4.9.
using GompParallelFn = void (*)(void (*body)(void*), void* data, unsigned num_threads, unsigned flags);
using ThreadNumFn = int (*)();

struct HostRuntime {
  GompParallelFn parallel = nullptr;
  ThreadNumFn thread_num = nullptr;
  std::string library;
};

HostRuntime g_runtime;  // written once, under g_once
std::once_flag g_once;
std::atomic<bool> g_forked_child{false};  // the parent's team does not exist in a forked child

#if defined(LWK_FIND_HOST_OPENMP)
bool is_openmp_runtime_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  const char* base = slash ? slash + 1 : path;
  for (const char* prefix : {"libgomp", "libomp", "libiomp"}) {
    if (std::strncmp(base, prefix, std::strlen(prefix)) == 0) return true;
  }
  return false;
}

int collect_openmp_names(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name && *name && is_openmp_runtime_name(name)) {
    static_cast<std::vector<std::string>*>(out)->emplace_back(name);
  }
  return 0;
}

void mark_forked_child() { g_forked_child.store(true, std::memory_order_relaxed); }

void find_runtime() {
  pthread_atfork(nullptr, nullptr, mark_forked_child);
  std::vector<std::string> names;
  dl_iterate_phdr(collect_openmp_names, &names);  // no dlopen inside: the loader's list is locked
  for (const std::string& name : names) {
    // RTLD_NOLOAD: only a runtime that is already loaded; the handle is kept (never dlclose'd),
    // so the runtime stays loaded for as long as this library may call it.
    void* handle = dlopen(name.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (!handle) continue;
    auto parallel = reinterpret_cast<GompParallelFn>(dlsym(handle, "GOMP_parallel"));
    auto thread_num = reinterpret_cast<ThreadNumFn>(dlsym(handle, "omp_get_thread_num"));
    if (parallel && thread_num) {
      g_runtime = HostRuntime{parallel, thread_num, name};
      return;
    }
    dlclose(handle);
  }
}
#else
void find_runtime() {}
#endif

const HostRuntime* runtime() {
  std::call_once(g_once, find_runtime);
  return g_runtime.parallel && !g_forked_child.load(std::memory_order_relaxed) ? &g_runtime : nullptr;
}

struct Region {
  TaskFn fn;
  void* ctx;
  int n;
  ThreadNumFn thread_num;
  std::mutex error_m;
  std::exception_ptr error;
};

void region_body(void* p) {
  auto* r = static_cast<Region*>(p);
  const int task = r->thread_num();
  if (task >= r->n) return;  // a runtime that gave us more threads than asked
  try {
    r->fn(r->ctx, task);
  } catch (...) {  // an exception must not leave an OpenMP region
    std::lock_guard<std::mutex> lk(r->error_m);
    if (!r->error) r->error = std::current_exception();
  }
}

}  // namespace

bool host_openmp_run(int n, TaskFn fn, void* ctx) {
  const HostRuntime* rt = runtime();
  if (!rt) return false;
  Region region{fn, ctx, n, rt->thread_num, {}, nullptr};
  rt->parallel(region_body, &region, static_cast<unsigned>(n), 0);
  if (region.error) std::rethrow_exception(region.error);
  return true;
}

std::string host_openmp_library() {
  const HostRuntime* rt = runtime();
  return rt ? rt->library : std::string();
}

}  // namespace detail
}  // namespace lwk
