/*
 * psm_gpu_warp.h: warp-level reductions and scans, written once for any
 * warp size.
 *
 * Each algorithm is a template over the warp size and over a "lanes" object
 * that exchanges a value between lanes:
 *   lanes.exchange_xor(value, lane_mask)  -> the value of lane (lane ^ mask)
 *   lanes.exchange_up(value, delta)       -> the value of lane (lane - delta),
 *                                            or the caller's own below delta
 * On the device the lanes object is psm_gpu_hardware_lanes (psm_gpu.h, the
 * hardware shuffles). The header also compiles as plain host C++, so a test
 * can run the same code on a simulated wave of 32 or 64 lanes, one host
 * thread per lane, with an exchange through a shared array and a barrier.
 *
 * All lanes of the warp must call each function together (the exchanges are
 * collective).
 */
#ifndef PSM_GPU_WARP_H
#define PSM_GPU_WARP_H

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSM_WARP_FN __device__ __forceinline__
#else
#define PSM_WARP_FN inline
#endif

/* Sum over the warp; every lane gets the total. Integer sums are exact and
 * associative, so the butterfly order does not matter. */
template <int WarpSize, typename T, typename Lanes>
PSM_WARP_FN T psm_warp_sum(T value, const Lanes &lanes)
{
    for (int lane_mask = WarpSize / 2; lane_mask > 0; lane_mask >>= 1)
        value += lanes.exchange_xor(value, lane_mask);
    return value;
}

/* Maximum over the warp; every lane gets it. */
template <int WarpSize, typename T, typename Lanes>
PSM_WARP_FN T psm_warp_max(T value, const Lanes &lanes)
{
    for (int lane_mask = WarpSize / 2; lane_mask > 0; lane_mask >>= 1) {
        T other = lanes.exchange_xor(value, lane_mask);
        value = other > value ? other : value;
    }
    return value;
}

/* Logical OR over the warp of a 0/1 flag. */
template <int WarpSize, typename Lanes>
PSM_WARP_FN unsigned psm_warp_any(unsigned flag, const Lanes &lanes)
{
    for (int lane_mask = WarpSize / 2; lane_mask > 0; lane_mask >>= 1)
        flag |= lanes.exchange_xor(flag, lane_mask);
    return flag;
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

#endif /* PSM_GPU_WARP_H */
