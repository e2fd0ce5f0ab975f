// The persistent worker pool behind every CPU kernel of ds4d._cpu.
//
// A product is cut into independent tasks (ranges of rows and tokens, see matmul.cpp); run() hands them out
// through one atomic counter to the workers and to the calling thread, and returns when all are done. Results
// never depend on who ran which task, so scheduling is free to be dynamic. One run() at a time: concurrent
// callers (several Python threads with the GIL released) queue on a mutex. Idle workers spin for a few tens of
// microseconds before sleeping, because decode issues many short products back to back.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ds4::cpu {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int threads() const { return n_threads_; }
    // Stops the workers and starts n_threads - 1 new ones (the caller is the n-th); waits for a running product.
    void resize(int n_threads);
    // Calls task(i) once for every i in [0, n_tasks), spread over the workers and the calling thread.
    void run(int64_t n_tasks, const std::function<void(int64_t)>& task);

private:
    void start(int n_threads);
    void stop();
    void worker_loop(uint64_t seen);
    void drain();

    std::mutex run_mu_;  // one product at a time
    int n_threads_ = 1;
    std::vector<std::thread> workers_;

    std::mutex mu_;
    std::condition_variable wake_cv_, done_cv_;
    std::atomic<bool> stopping_{false};
    std::atomic<int> pending_{0};             // workers that have not finished the current product
    std::atomic<uint64_t> generation_{0};    // bumped once per product; workers wait for a new value
    const std::function<void(int64_t)>* task_ = nullptr;
    int64_t n_tasks_ = 0;
    std::atomic<int64_t> next_{0};
};

}  // namespace ds4::cpu
