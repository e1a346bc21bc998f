// The most this machine reads from memory per second: each of T threads sums its own part of a large buffer
// in 64-bit words (the compiler vectorises the loop for the CPU it is built on), with and without a software
// prefetch into L2 (1-8 KiB ahead), best of 5 passes after a warm-up. A decode step that reads its weights
// once cannot go faster than bytes per token / this figure (benchmarks/results/quant_gemv.md).
//
//     cc -O3 -march=native -fopenmp benchmarks/read_bandwidth.c -o /tmp/read_bandwidth
//     /tmp/read_bandwidth [MiB, default 1024] [threads, default 2]
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// the sum of n words, prefetching `ahead` bytes ahead (0: none)
static uint64_t sum_words(const uint64_t* p, size_t n, size_t ahead) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    const size_t step = 64 / sizeof(uint64_t);          // one cache line
    for (size_t i = 0; i + step <= n; i += step) {
        if (ahead) __builtin_prefetch((const char*)(p + i) + ahead, 0, 2);
        s0 += p[i] + p[i + 4];
        s1 += p[i + 1] + p[i + 5];
        s2 += p[i + 2] + p[i + 6];
        s3 += p[i + 3] + p[i + 7];
    }
    return s0 + s1 + s2 + s3;
}

int main(int argc, char** argv) {
    const size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024;
    const int threads = argc > 2 ? atoi(argv[2]) : 2;
    const size_t bytes = mib << 20, words = bytes / sizeof(uint64_t);
    if (mib == 0 || threads < 1) {
        fprintf(stderr, "usage: %s [MiB > 0] [threads >= 1]\n", argv[0]);
        return 2;
    }
    uint64_t* buf = aligned_alloc(4096, bytes);
    if (!buf) {
        fprintf(stderr, "could not allocate %zu MiB\n", mib);
        return 2;
    }
    memset(buf, 1, bytes);
    const size_t aheads[] = {0, 1024, 2048, 4096, 8192};
    double best_all = 0.0;
    volatile uint64_t sink = 0;      // a volatile store keeps the sums from being optimised away
    for (int a = 0; a < 5; ++a) {
        double best = 1e30;
        for (int rep = 0; rep < 6; ++rep) {
            uint64_t total = 0;
            const double t0 = now();
#pragma omp parallel num_threads(threads) reduction(+ : total)
            {
                const size_t t = omp_get_thread_num(), nt = omp_get_num_threads();
                const size_t w0 = words * t / nt / 8 * 8, w1 = words * (t + 1) / nt / 8 * 8;
                total += sum_words(buf + w0, w1 - w0, aheads[a]);
            }
            const double dt = now() - t0;
            sink += total;
            if (rep > 0 && dt < best) best = dt;
        }
        const double gbs = bytes / best / 1e9;
        if (gbs > best_all) best_all = gbs;
        printf("prefetch %4zu B ahead: %.1f GB/s\n", aheads[a], gbs);
    }
    printf("read bandwidth, best: %.1f GB/s (threads: %d, buffer: %zu MiB)\n", best_all, threads, mib);
    free(buf);
    return 0;
}
