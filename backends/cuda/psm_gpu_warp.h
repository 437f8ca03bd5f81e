/*
 * psm_gpu_warp.h: every warp-size-dependent algorithm of the kernels,
 * written once for any warp size (32 on NVIDIA and RDNA, 64 on CDNA).
 *
 * Each algorithm is a template over the warp size and over a "lanes" object
 * that exchanges values between the lanes of one warp:
 *   lanes.exchange_xor(value, lane_mask)  -> the value of lane (lane ^ mask)
 *   lanes.exchange_up(value, delta)       -> the value of lane (lane - delta),
 *                                            or the caller's own below delta
 *   lanes.exchange_from(value, source)    -> the value of lane `source`
 *   lanes.first_lane_where(predicate)     -> the lowest lane whose predicate
 *                                            is non-zero, -1 when none (a
 *                                            ballot: 64 bits wide on AMD)
 * The block-level algorithms also take a "block" object whose barrier()
 * waits for every thread of the block.
 *
 * On the device these are psm_gpu_hardware_lanes / psm_gpu_hardware_block
 * (psm_gpu.h: the hardware shuffles, ballot and __syncthreads). The header
 * also compiles as plain host C++ (it includes nothing), and
 * tests/test_warp.cpp runs the same code on simulated waves of 32 and 64
 * lanes, one host thread per lane, so that the wave64 paths, which no
 * machine of this project's CI has, run somewhere.
 *
 * All lanes of a warp (all threads of a block, for the block algorithms)
 * must call each function together: the exchanges are collective.
 */
#ifndef PSM_GPU_WARP_H
#define PSM_GPU_WARP_H

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSM_WARP_FN __device__ __forceinline__
#else
#define PSM_WARP_FN inline
#endif

/* ---- warp reductions and scans ------------------------------------------ */

struct psm_warp_op_sum {
    template <typename T>
    PSM_WARP_FN T operator()(T a, T b) const { return a + b; }
};
struct psm_warp_op_max {
    template <typename T>
    PSM_WARP_FN T operator()(T a, T b) const { return b > a ? b : a; }
};
struct psm_warp_op_or {
    template <typename T>
    PSM_WARP_FN T operator()(T a, T b) const { return a | b; }
};

/* Butterfly reduction: every lane gets op over all lanes. The ops used are
 * associative and commutative on the integers they see (sums of integers
 * are exact), so the order of the butterfly does not matter. */
template <int WarpSize, typename T, typename Op, typename Lanes>
PSM_WARP_FN T psm_warp_reduce(T value, const Op &op, const Lanes &lanes)
{
    for (int lane_mask = WarpSize / 2; lane_mask > 0; lane_mask >>= 1)
        value = op(value, lanes.exchange_xor(value, lane_mask));
    return value;
}

template <int WarpSize, typename T, typename Lanes>
PSM_WARP_FN T psm_warp_sum(T value, const Lanes &lanes)
{
    return psm_warp_reduce<WarpSize>(value, psm_warp_op_sum(), lanes);
}

template <int WarpSize, typename T, typename Lanes>
PSM_WARP_FN T psm_warp_max(T value, const Lanes &lanes)
{
    return psm_warp_reduce<WarpSize>(value, psm_warp_op_max(), lanes);
}

/* Logical OR over the warp of a 0/1 flag. */
template <int WarpSize, typename Lanes>
PSM_WARP_FN unsigned psm_warp_any(unsigned flag, const Lanes &lanes)
{
    return psm_warp_reduce<WarpSize>(flag, psm_warp_op_or(), lanes);
}

/* Inclusive prefix sum in lane order (Hillis-Steele): lane l gets the sum of
 * lanes 0..l. */
template <int WarpSize, typename T, typename Lanes>
PSM_WARP_FN T psm_warp_inclusive_scan(T value, int lane, const Lanes &lanes)
{
    for (unsigned delta = 1; delta < (unsigned)WarpSize; delta <<= 1) {
        T lower = lanes.exchange_up(value, delta);
        if (lane >= (int)delta)
            value += lower;
    }
    return value;
}

/* ---- searches over running totals --------------------------------------- */

/* Lane l holds the amount `amount` (>= 0); the lanes' amounts laid end to end
 * in lane order cover [0, total). The owner of `target` (< total) is the
 * lane whose interval [begin, begin + amount) contains it. Every lane gets
 * the owner and its own begin. */
template <typename T>
struct psm_warp_owner {
    int lane;
    T begin;
};
template <int WarpSize, typename T, typename Lanes>
PSM_WARP_FN psm_warp_owner<T> psm_warp_find_owner(T amount, T target, int lane,
                                                  const Lanes &lanes)
{
    const T end = psm_warp_inclusive_scan<WarpSize>(amount, lane, lanes);
    psm_warp_owner<T> owner;
    owner.begin = end - amount;
    owner.lane = lanes.first_lane_where(owner.begin <= target && target < end);
    return owner;
}

/* The first index i in [0, count) with values(i) > target, for values(i)
 * non-decreasing in i; count when there is none. Every lane gets it. Each
 * round the lanes read the last element of WarpSize consecutive chunks of
 * the indices still open and keep the chunk of the first that exceeds the
 * target: about log_WarpSize(count) rounds of one read per lane, where a
 * binary search makes log2(count) reads one after another. */
template <int WarpSize, typename T, typename Values, typename Lanes>
PSM_WARP_FN long long psm_warp_upper_bound(const Values &values, long long count, T target,
                                           int lane, const Lanes &lanes)
{
    /* The answer is in [low, high]; values(high) > target unless high == count. */
    long long low = 0, high = count;
    while (low < high) {
        const long long step = (high - low + WarpSize - 1) / WarpSize;
        const long long chunk_begin = low + (long long)lane * step;
        const long long chunk_end = chunk_begin + step < high ? chunk_begin + step : high;
        const int exceeds = chunk_begin < high && values(chunk_end - 1) > target;
        const int first = lanes.first_lane_where(exceeds);
        if (first < 0)
            break; /* every open index is <= target: the answer is high */
        const long long first_end = lanes.exchange_from(chunk_end, first);
        low = low + (long long)first * step;
        high = first_end - 1;
    }
    return high;
}

/* ---- block reductions and scans ----------------------------------------- */

/* Blocks of `threads` threads (a multiple of WarpSize, at most
 * WarpSize * WarpSize), thread t in lane t % WarpSize of warp t / WarpSize.
 * warp_values has a slot per warp and broadcast one slot, both shared by
 * the block. Every thread gets the result; the scratch may be reused once
 * the function returns (it ends with a barrier). */
template <int WarpSize, typename T, typename Op, typename Lanes, typename Block>
PSM_WARP_FN T psm_block_reduce(T value, const Op &op, int thread, int threads, T *warp_values,
                               T *broadcast, const Lanes &lanes, const Block &block)
{
    const int lane = thread % WarpSize, warp = thread / WarpSize;
    value = psm_warp_reduce<WarpSize>(value, op, lanes);
    if (lane == 0)
        warp_values[warp] = value;
    block.barrier();
    if (warp == 0) {
        /* Lanes past the last warp contribute op's identity: 0 for the sums
         * and maxima of unsigned values this is used with. */
        T v = lane < threads / WarpSize ? warp_values[lane] : T(0);
        v = psm_warp_reduce<WarpSize>(v, op, lanes);
        if (lane == 0)
            *broadcast = v;
    }
    block.barrier();
    value = *broadcast;
    block.barrier();
    return value;
}

/* Inclusive scan over the block in thread order; *block_total gets the sum. */
template <int WarpSize, typename T, typename Lanes, typename Block>
PSM_WARP_FN T psm_block_inclusive_scan(T value, T *block_total, int thread, int threads,
                                       T *warp_values, T *broadcast, const Lanes &lanes,
                                       const Block &block)
{
    const int lane = thread % WarpSize, warp = thread / WarpSize;
    const int warps = threads / WarpSize;
    T inclusive = psm_warp_inclusive_scan<WarpSize>(value, lane, lanes);
    if (lane == WarpSize - 1)
        warp_values[warp] = inclusive;
    block.barrier();
    if (warp == 0) {
        T v = lane < warps ? warp_values[lane] : T(0);
        T scanned = psm_warp_inclusive_scan<WarpSize>(v, lane, lanes);
        if (lane < warps)
            warp_values[lane] = scanned - v; /* exclusive offset of each warp */
        if (lane == WarpSize - 1)
            *broadcast = scanned;
    }
    block.barrier();
    inclusive += warp_values[warp];
    *block_total = *broadcast;
    block.barrier();
    return inclusive;
}

#endif /* PSM_GPU_WARP_H */
