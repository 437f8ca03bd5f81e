/*
 * test_warp.cpp: the warp and block algorithms of backends/cuda/psm_gpu_warp.h
 * (the only code of the GPU kernels whose behaviour depends on the wave
 * size) on simulated waves of 32 and 64 lanes, against serial results.
 *
 * No AMD GPU is available to this project, and NVIDIA warps are 32 wide, so
 * this is where the wave64 code of the HIP backend (CDNA: gfx90a, gfx940)
 * runs. Each simulated lane is a host thread; lanes exchange values through
 * a shared array between two barriers (a shuffle), ballot builds a 64-bit
 * mask, and a block barrier spans every thread of the block, so a lane that
 * read the wrong partner, a mask 32 bits wide or a missing barrier gives a
 * wrong result. The values are chosen to expose that: powers of two per
 * lane (every lane's contribution is a distinct bit), extremes and single
 * set flags placed in each lane in turn, upper-half lanes in particular. A
 * control runs the wave32 instantiation on a 64-lane wave and requires the
 * checks to fail, so the test is known to see a wrong lane count.
 *
 * Plain C++ (no Check): prints one line per group and the harness's
 * `summary:` line; exits 1 on any failure.
 */
#include "psm_gpu_warp.h"

#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

typedef std::uint64_t u64;

/* ---- the simulated hardware --------------------------------------------- */

class Barrier {
public:
    explicit Barrier(int count) : count_(count) {}
    void wait()
    {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long generation = generation_;
        if (++waiting_ == count_) {
            waiting_ = 0;
            ++generation_;
            changed_.notify_all();
            return;
        }
        changed_.wait(lock, [&] { return generation_ != generation; });
    }

private:
    std::mutex mutex_;
    std::condition_variable changed_;
    const int count_;
    int waiting_ = 0;
    unsigned long generation_ = 0;
};

/* One wave: its lanes' exchange slots and the barrier they meet at. */
struct SimWave {
    explicit SimWave(int width) : barrier(width) {}
    Barrier barrier;
    u64 slots[64] = {};
};

/* The lanes object of psm_gpu_warp.h for one lane of a simulated wave. */
struct SimLanes {
    SimWave *wave;
    int lane;

    /* Every lane publishes its value, then reads lane `source`'s. */
    template <typename T>
    T read_from(T value, int source) const
    {
        static_assert(sizeof(T) <= sizeof(u64), "one slot per lane");
        u64 bits = 0;
        std::memcpy(&bits, &value, sizeof value);
        wave->slots[lane] = bits;
        wave->barrier.wait();
        const u64 other = wave->slots[source];
        wave->barrier.wait();
        T result;
        std::memcpy(&result, &other, sizeof result);
        return result;
    }
    template <typename T>
    T exchange_xor(T value, int lane_mask) const
    {
        return read_from(value, lane ^ lane_mask);
    }
    template <typename T>
    T exchange_up(T value, unsigned delta) const
    {
        return read_from(value, lane >= (int)delta ? lane - (int)delta : lane);
    }
    template <typename T>
    T exchange_from(T value, int source_lane) const
    {
        return read_from(value, source_lane);
    }
    /* A 64-bit ballot, then its lowest set bit. */
    int first_lane_where(int predicate) const
    {
        wave->slots[lane] = predicate ? 1u : 0u;
        wave->barrier.wait();
        u64 ballot = 0;
        for (int l = 0; l < 64; ++l)
            ballot |= (wave->slots[l] & 1u) << l;
        wave->barrier.wait();
        return ballot ? __builtin_ctzll(ballot) : -1;
    }
};

struct SimBlock {
    Barrier *all;
    void barrier() const { all->wait(); }
};

/* Runs body(thread, lanes, block) on `threads` threads in waves of `width`
 * lanes (the simulated hardware's width, which the algorithm's WarpSize
 * should match). Before each run the waves' slots are cleared, so that a
 * lane past the wave's width reads zeros. */
template <class Body>
void run_block(int width, int threads, const Body &body)
{
    std::vector<std::unique_ptr<SimWave>> waves;
    for (int w = 0; w < threads / width; ++w)
        waves.emplace_back(new SimWave(width));
    Barrier block_barrier(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            const SimLanes lanes = {waves[t / width].get(), t % width};
            const SimBlock block = {&block_barrier};
            body(t, lanes, block);
        });
    for (std::thread &thread : pool)
        thread.join();
}

/* ---- inputs and checks -------------------------------------------------- */

u64 splitmix(u64 *state)
{
    u64 z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

int checks_run = 0, checks_failed = 0;

/* Compares got[i] with want[i]; reports the first few mismatches. Returns
 * whether all matched (counted as one check). */
bool expect_equal(const char *what, int width, const std::vector<u64> &got,
                  const std::vector<u64> &want, bool quiet = false)
{
    int bad = 0;
    for (std::size_t i = 0; i < want.size(); ++i)
        if (got[i] != want[i] && ++bad <= 3 && !quiet)
            std::printf("  FAIL wave%d %s: [%zu] got %llu, want %llu\n", width, what, i,
                        (unsigned long long)got[i], (unsigned long long)want[i]);
    if (!quiet) {
        ++checks_run;
        checks_failed += bad != 0;
    }
    return bad == 0;
}

/* Input sets for one wave: each case gives every lane a value. */
std::vector<std::vector<u64>> lane_cases(int width, u64 seed)
{
    std::vector<std::vector<u64>> cases;
    std::vector<u64> powers(width);
    for (int l = 0; l < width; ++l)
        powers[l] = (u64)1 << l; /* each lane a distinct bit */
    cases.push_back(powers);
    for (int hot = 0; hot < width; ++hot) { /* one large value, in each lane */
        std::vector<u64> one(width, 3);
        one[hot] = 1000 + (u64)hot;
        cases.push_back(one);
    }
    for (int r = 0; r < 8; ++r) {
        std::vector<u64> random(width);
        for (int l = 0; l < width; ++l)
            random[l] = splitmix(&seed) >> (r * 7); /* full range down to small */
        cases.push_back(random);
    }
    return cases;
}

/* ---- the warp algorithms ------------------------------------------------- */

/* Sum, max, any, inclusive scan of every case, as WarpSize-wide algorithms
 * on a wave of `width` lanes. Returns whether all matched; `quiet` only
 * reports (the control). */
template <int WarpSize>
bool check_warp_reductions(int width, bool quiet)
{
    const std::vector<std::vector<u64>> cases = lane_cases(width, 11 + width);
    const std::size_t n = cases.size();
    std::vector<u64> sum(n * width), max(n * width), scan(n * width), any(n * width),
        count(n * width);
    run_block(width, width, [&](int lane, const SimLanes &lanes, const SimBlock &) {
        for (std::size_t c = 0; c < n; ++c) {
            const u64 v = cases[c][lane];
            sum[c * width + lane] = psm_warp_sum<WarpSize>(v, lanes);
            max[c * width + lane] = psm_warp_max<WarpSize>(v, lanes);
            scan[c * width + lane] = psm_warp_inclusive_scan<WarpSize>(v, lane, lanes);
            /* any: only the case's largest lane raises the flag */
            const unsigned flag = v >= 1000 && v < 1000 + 64 ? 1u : 0u;
            any[c * width + lane] = psm_warp_any<WarpSize>(flag, lanes);
            count[c * width + lane] = psm_warp_sum<WarpSize>((unsigned)(v & 0xffu), lanes);
        }
    });
    std::vector<u64> want_sum(n * width), want_max(n * width), want_scan(n * width),
        want_any(n * width), want_count(n * width);
    for (std::size_t c = 0; c < n; ++c) {
        u64 total = 0, largest = 0, running = 0, flagged = 0;
        unsigned low_bytes = 0;
        for (int l = 0; l < width; ++l) {
            const u64 v = cases[c][l];
            total += v;
            largest = v > largest ? v : largest;
            flagged |= v >= 1000 && v < 1000 + 64;
            low_bytes += (unsigned)(v & 0xffu);
        }
        for (int l = 0; l < width; ++l) {
            running += cases[c][l];
            want_sum[c * width + l] = total;
            want_max[c * width + l] = largest;
            want_scan[c * width + l] = running;
            want_any[c * width + l] = flagged;
            want_count[c * width + l] = low_bytes;
        }
    }
    bool ok = expect_equal("sum (u64)", width, sum, want_sum, quiet);
    ok &= expect_equal("sum (u32)", width, count, want_count, quiet);
    ok &= expect_equal("max", width, max, want_max, quiet);
    ok &= expect_equal("any", width, any, want_any, quiet);
    ok &= expect_equal("inclusive scan", width, scan, want_scan, quiet);
    return ok;
}

/* Owner of a target in lane order. */
template <int WarpSize>
void check_warp_find_owner()
{
    const int width = WarpSize;
    u64 seed = 77 + width;
    struct Case {
        std::vector<u64> amounts; /* per lane */
        u64 target;
    };
    std::vector<Case> owner_cases;
    for (int c = 0; c < 40; ++c) {
        Case owner = {std::vector<u64>(width), 0};
        u64 total = 0;
        for (int l = 0; l < width; ++l) {
            /* zero-amount lanes own nothing; later cases favour high lanes */
            owner.amounts[l] = splitmix(&seed) % 3 == 0 ? 0 : splitmix(&seed) % 1000;
            if (c % 2 && l < width / 2)
                owner.amounts[l] = 0;
            total += owner.amounts[l];
        }
        if (total == 0)
            owner.amounts[width - 1] = total = 5;
        owner.target = c == 0 ? total - 1 : splitmix(&seed) % total;
        owner_cases.push_back(owner);
    }

    const std::size_t n = owner_cases.size();
    std::vector<u64> owner_lane(n * width), owner_begin(n * width);
    run_block(width, width, [&](int lane, const SimLanes &lanes, const SimBlock &) {
        for (std::size_t c = 0; c < n; ++c) {
            const Case &o = owner_cases[c];
            const psm_warp_owner<u64> found =
                psm_warp_find_owner<WarpSize>(o.amounts[lane], o.target, lane, lanes);
            owner_lane[c * width + lane] = (u64)(long long)found.lane;
            owner_begin[c * width + lane] = found.begin;
        }
    });

    std::vector<u64> want_owner(n * width), want_begin(n * width);
    for (std::size_t c = 0; c < n; ++c) {
        const Case &o = owner_cases[c];
        u64 running = 0;
        int owner = -1;
        for (int l = 0; l < width; ++l) {
            want_begin[c * width + l] = running;
            if (owner < 0 && running <= o.target && o.target < running + o.amounts[l])
                owner = l;
            running += o.amounts[l];
        }
        for (int l = 0; l < width; ++l)
            want_owner[c * width + l] = (u64)(long long)owner;
    }
    expect_equal("find owner: lane", width, owner_lane, want_owner);
    expect_equal("find owner: begin", width, owner_begin, want_begin);
}

/* The warp upper bound over sorted arrays of many lengths (empty, shorter
 * than a wave, one element past a power of the width, long), with repeated
 * values and targets below, inside, on and above the values, against the
 * serial first index whose value exceeds the target. */
struct Sorted {
    const std::vector<u64> *values;
    u64 operator()(long long i) const { return (*values)[(std::size_t)i]; }
};

template <int WarpSize>
void check_warp_upper_bound()
{
    const int width = WarpSize;
    const long long lengths[] = {0, 1, 2, 5, WarpSize - 1, WarpSize, WarpSize + 1,
                                 WarpSize * WarpSize + 1, 149, 1000, 5000};
    u64 seed = 99 + width;
    std::vector<std::vector<u64>> arrays;
    std::vector<u64> targets;
    for (long long n : lengths) {
        std::vector<u64> values((std::size_t)n);
        u64 running = 0;
        for (long long i = 0; i < n; ++i) {
            running += splitmix(&seed) % 3 == 0 ? 0 : splitmix(&seed) % 100; /* repeats */
            values[(std::size_t)i] = running;
        }
        const u64 last = n ? values.back() : 0;
        const u64 picks[] = {0, last, last + 1, n ? values[(std::size_t)(n / 2)] : 0,
                             last ? splitmix(&seed) % last : 0};
        for (u64 target : picks) {
            arrays.push_back(values);
            targets.push_back(target);
        }
    }
    const std::size_t n = arrays.size();
    std::vector<u64> got(n * width), want(n * width);
    run_block(width, width, [&](int lane, const SimLanes &lanes, const SimBlock &) {
        for (std::size_t c = 0; c < n; ++c) {
            const Sorted values = {&arrays[c]};
            got[c * width + lane] = (u64)psm_warp_upper_bound<WarpSize>(
                values, (long long)arrays[c].size(), targets[c], lane, lanes);
        }
    });
    for (std::size_t c = 0; c < n; ++c) {
        std::size_t first = 0;
        while (first < arrays[c].size() && arrays[c][first] <= targets[c])
            ++first;
        for (int l = 0; l < width; ++l)
            want[c * width + l] = first;
    }
    expect_equal("upper bound", width, got, want);
}

/* ---- the block algorithms ------------------------------------------------ */

/* Block max, sum and inclusive scan over `threads` threads (the kernels use
 * 128 and 512), the shared scratch one slot per warp. */
template <int WarpSize>
void check_block(int threads)
{
    const int width = WarpSize;
    u64 seed = 5 + threads + width;
    const int case_count = 6;
    std::vector<std::vector<u64>> cases;
    for (int c = 0; c < case_count; ++c) {
        std::vector<u64> values(threads);
        for (int t = 0; t < threads; ++t)
            values[t] = c == 0 ? (u64)t : splitmix(&seed) >> (8 + 8 * (c % 4));
        if (c == 1)
            values[threads - 1] = ~(u64)0 >> 1; /* the maximum in the last warp */
        cases.push_back(values);
    }
    std::vector<u64> max(case_count * threads), sum(case_count * threads),
        scan(case_count * threads), total(case_count * threads);
    std::vector<u64> warp_values(threads / width);
    u64 broadcast = 0;
    run_block(width, threads, [&](int thread, const SimLanes &lanes, const SimBlock &block) {
        for (int c = 0; c < case_count; ++c) {
            const u64 v = cases[c][thread];
            const std::size_t at = (std::size_t)c * threads + thread;
            max[at] = psm_block_reduce<WarpSize>(v, psm_warp_op_max(), thread, threads,
                                                 warp_values.data(), &broadcast, lanes, block);
            sum[at] = psm_block_reduce<WarpSize>(v, psm_warp_op_sum(), thread, threads,
                                                 warp_values.data(), &broadcast, lanes, block);
            u64 block_total = 0;
            scan[at] = psm_block_inclusive_scan<WarpSize>(v, &block_total, thread, threads,
                                                          warp_values.data(), &broadcast,
                                                          lanes, block);
            total[at] = block_total;
        }
    });
    std::vector<u64> want_max(max.size()), want_sum(sum.size()), want_scan(scan.size());
    for (int c = 0; c < case_count; ++c) {
        u64 largest = 0, all = 0;
        for (int t = 0; t < threads; ++t) {
            largest = cases[c][t] > largest ? cases[c][t] : largest;
            all += cases[c][t];
        }
        u64 running = 0;
        for (int t = 0; t < threads; ++t) {
            running += cases[c][t];
            want_max[(std::size_t)c * threads + t] = largest;
            want_sum[(std::size_t)c * threads + t] = all;
            want_scan[(std::size_t)c * threads + t] = running;
        }
    }
    char what[64];
    std::snprintf(what, sizeof what, "block max (%d threads)", threads);
    expect_equal(what, width, max, want_max);
    std::snprintf(what, sizeof what, "block sum (%d threads)", threads);
    expect_equal(what, width, sum, want_sum);
    std::snprintf(what, sizeof what, "block scan (%d threads)", threads);
    expect_equal(what, width, scan, want_scan);
    std::snprintf(what, sizeof what, "block scan total (%d threads)", threads);
    expect_equal(what, width, total, want_sum);
}

template <int WarpSize>
void check_wave()
{
    const int failed_before = checks_failed, run_before = checks_run;
    check_warp_reductions<WarpSize>(WarpSize, false);
    check_warp_find_owner<WarpSize>();
    check_warp_upper_bound<WarpSize>();
    check_block<WarpSize>(128);
    check_block<WarpSize>(512);
    std::printf("wave%d: %d checks, %d failed\n", WarpSize, checks_run - run_before,
                checks_failed - failed_before);
}

} /* namespace */

int main()
{
    check_wave<32>();
    check_wave<64>();

    /* Control: the wave32 algorithms on a 64-lane wave must be caught. */
    const bool control_caught = !check_warp_reductions<32>(64, true);
    ++checks_run;
    if (!control_caught)
        ++checks_failed;
    std::printf("control: wave32 algorithms on a 64-lane wave %s\n",
                control_caught ? "are caught (as they must be)" : "PASS: the test cannot see a wrong wave size");

    std::printf("summary: test_warp: %d run, %d failed, 0 skipped; backends run: "
                "none (simulated waves of 32 and 64 lanes)\n",
                checks_run, checks_failed);
    return checks_failed ? 1 : 0;
}
