// Sums (and maxima) in a fixed order that vectorises: kLanes interleaved partial sums, then the lanes pairwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace remat::cpu {

// Sums over a run in kLanes interleaved partial sums (element i into lane i mod kLanes, each lane
// in index order), the lanes then added pairwise: a fixed order, the same for every row and thread
// count, that the compiler turns into vector adds where one running sum is a chain of dependent
// adds, one at a time. A product is fused into its addition explicitly (mul_add), so no
// element's rounding depends on what the compiler chose to contract.
constexpr int kLanes = 16;

// a b + c, one rounding where the CPU has FMA. Without FMA instructions (a build without
// -march=native) std::fma is a software routine, tens of times slower, and nothing can contract.
template <typename T>
T mul_add(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The lanes are indexed by constants only (loops unrolled, the tail's lanes each under a test),
// so that the compiler keeps them in registers: an array indexed by a variable lives in memory,
// which under AddressSanitizer slowed layer_norm on tiny rows enough to change the options the
// budget planner found cheapest in tests/test_schedule.cpp.
template <typename T>
T fold_lanes(T (&acc)[kLanes]) {
#pragma GCC unroll 4
  for (int w = kLanes / 2; w > 0; w /= 2)
#pragma GCC unroll 8
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// acc[i mod kLanes] += a(i), i < n, each lane in index order (a run's lanes start at its first
// element; a sum over several runs adds them into the same lanes, run after run).
template <typename T, typename A>
void lane_sum_into(T (&acc)[kLanes], int64_t n, A a) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) acc[l] += a(i + l);
#pragma GCC unroll 16
  for (int l = 0; l < kLanes; ++l)
    if (i + l < n) acc[l] += a(i + l);
}

// acc[i mod kLanes] += a(i) b(i), i < n, as lane_sum_into.
template <typename T, typename A, typename B>
void lane_dot_into(T (&acc)[kLanes], int64_t n, A a, B b) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) acc[l] = mul_add(a(i + l), b(i + l), acc[l]);
#pragma GCC unroll 16
  for (int l = 0; l < kLanes; ++l)
    if (i + l < n) acc[l] = mul_add(a(i + l), b(i + l), acc[l]);
}

// sum_i x[i], i < n.
template <typename T>
T lane_sum(const T* x, int64_t n) {
  T acc[kLanes] = {};
  lane_sum_into(acc, n, [x](int64_t i) { return x[i]; });
  return fold_lanes(acc);
}

// sum_i a(i) b(i), i < n.
template <typename T, typename A, typename B>
T lane_dot(int64_t n, A a, B b) {
  T acc[kLanes] = {};
  lane_dot_into(acc, n, a, b);
  return fold_lanes(acc);
}

// max_i x[i], i < n (-inf for n = 0), in kLanes interleaved running maxima folded pairwise. Each
// step is `v > m ? v : m` (one vector max instruction), so NaNs are passed over as a running
// maximum in index order passes over them, and the value is that maximum's; only the sign of a
// maximum of zero may differ (+0 and -0 compare equal), which no shift by it can tell apart.
template <typename T>
T lane_max(const T* x, int64_t n) {
  T acc[kLanes];
#pragma GCC unroll 16
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  auto take = [](T v, T m) { return v > m ? v : m; };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) acc[l] = take(x[i + l], acc[l]);
#pragma GCC unroll 16
  for (int l = 0; l < kLanes; ++l)
    if (i + l < n) acc[l] = take(x[i + l], acc[l]);
#pragma GCC unroll 4
  for (int w = kLanes / 2; w > 0; w /= 2)
#pragma GCC unroll 8
    for (int l = 0; l < w; ++l) acc[l] = take(acc[l + w], acc[l]);
  return acc[0];
}

}  // namespace remat::cpu
