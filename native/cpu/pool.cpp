// The persistent worker pool (see pool.h for the contract).
#include "pool.h"

#include <chrono>

namespace ds4::cpu {

namespace {

// How long an idle thread polls before it blocks: long enough to bridge the Python work between two products of
// one decode step, short enough not to burn a core when the engine is idle.
constexpr auto kSpin = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

template <class Ready>
bool spin_until(Ready ready) {
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
        if (ready()) return true;
        cpu_relax();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return false;
    }
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) { start(n_threads); }

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::resize(int n_threads) {
    std::lock_guard<std::mutex> serial(run_mu_);
    stop();
    start(n_threads);
}

void ThreadPool::start(int n_threads) {
    n_threads_ = n_threads < 1 ? 1 : n_threads;
    const uint64_t seen = generation_.load();
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, seen] { worker_loop(seen); });
}

void ThreadPool::stop() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stopping_.store(true);
    }
    wake_cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stopping_.store(false);
}

void ThreadPool::drain() {
    for (;;) {
        const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
        if (i >= n_tasks_) return;
        (*task_)(i);
    }
}

void ThreadPool::worker_loop(uint64_t seen) {
    for (;;) {
        spin_until([&] { return generation_.load(std::memory_order_acquire) != seen || stopping_.load(); });
        {
            std::unique_lock<std::mutex> lk(mu_);
            wake_cv_.wait(lk, [&] { return stopping_.load() || generation_.load() != seen; });
            if (stopping_.load()) return;
            seen = generation_.load();
        }
        drain();
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lk(mu_);
            done_cv_.notify_all();
        }
    }
}

void ThreadPool::run(int64_t n_tasks, const std::function<void(int64_t)>& task) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> serial(run_mu_);
    if (workers_.empty() || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; ++i) task(i);
        return;
    }
    {
        std::lock_guard<std::mutex> lk(mu_);
        task_ = &task;
        n_tasks_ = n_tasks;
        next_.store(0, std::memory_order_relaxed);
        pending_.store((int)workers_.size());
        generation_.fetch_add(1, std::memory_order_release);
    }
    wake_cv_.notify_all();
    drain();
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return pending_.load() == 0; });
    }
    task_ = nullptr;
}

}  // namespace ds4::cpu
