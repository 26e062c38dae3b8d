// band_tiles and band_query_blocks (csrc/tile_sm80.cuh) against brute force, on the host: every
// key tile some row of a query block sees (every query block that sees some key of a key block)
// lies in the range given, and every one left unmasked needs no mask.
// Built and run by tests/test_band_tiles.py.
#include <cstdio>
#include <vector>
#include "tile_sm80.cuh"
using namespace flash;
// Calls f(nq, nk, left, right, sees) over the grid of lengths and window sides; sees(i, j): query i sees key j.
template <typename F>
void for_each_problem(F f) {
    for (int nq = 1; nq <= 70; nq += 3) for (int nk = 1; nk <= 70; nk += 3)
    for (int left : {kUnboundedWindow, 0, 1, 5, 17, 64, 100}) for (int right : {kUnboundedWindow, 0, 1, 3, 16, 65}) {
        const int diag = nk - nq;
        f(nq, nk, left, right, [=](int i, int j) { return j < nk && j >= i + diag - left && j <= i + diag + right; });
    }
}
template <int BM, int BN>
int check() {
    int bad = 0, cases = 0;
    for_each_problem([&](int nq, int nk, int left, int right, auto sees) {
    for (int m0 = 0; m0 < nq; m0 += BM) {
        const int diag = nk - nq;
        int ntiles = (nk + BN - 1) / BN;
        // brute force per tile: visible (some row of the block, rows m0..m0+BM-1), needs mask (some row sees not all its keys)
        int first = -1, end = -1;
        std::vector<int> needs(ntiles, 0), vis(ntiles, 0);
        for (int t = 0; t < ntiles; ++t) {
            bool any = false, all = true;
            for (int i = m0; i < m0 + BM; ++i) for (int j = t * BN; j < t * BN + BN; ++j) { bool s = sees(i, j); any |= s; all &= s; }
            vis[t] = any; needs[t] = any && !all;
            if (any) { if (first < 0) first = t; end = t + 1; }
        }
        BandTiles b = band_tiles<BM, BN>(m0, diag, nk, left, right);
        ++cases;
        int bfirst = b.end - b.count;
        bool ok = true;
        if (first < 0) ok = b.count == 0;
        else {
            // every visible tile inside [bfirst, b.end), every tile outside invisible
            for (int t = 0; t < ntiles; ++t) if (vis[t] && (t < bfirst || t >= b.end)) ok = false;
            // tiles the kernel treats as unmasked must not need the mask
            for (int it = 0; it < b.count; ++it) {
                int t = b.end - 1 - it;
                bool masked = it < b.masked_hi || it >= b.masked_hi + b.unmasked;
                if (!masked && needs[t]) ok = false;
            }
        }
        if (!ok && bad++ < 5) printf("BM=%d BN=%d nq=%d nk=%d m0=%d left=%d right=%d: first %d end %d | got end %d count %d hi %d un %d\n", BM, BN, nq, nk, m0, left, right, first, end, b.end, b.count, b.masked_hi, b.unmasked);
    }
    });
    printf("BM=%d BN=%d: %d cases, %d bad\n", BM, BN, cases, bad);
    return bad;
}
// The query blocks of BM rows that see key block [n0, n0 + BN): rows at or past nq see nothing
// and need no mask (the kernels give them P = 0), nor keys at or past nk (the kernels mask the
// ragged last key block throughout).
template <int BM, int BN>
int check_queries() {
    int bad = 0, cases = 0;
    for_each_problem([&](int nq, int nk, int left, int right, auto sees) {
    for (int n0 = 0; n0 < nk; n0 += BN) {
        const int diag = nk - nq;
        const int nblocks = (nq + BM - 1) / BM;
        BandQueryBlocks b = band_query_blocks<BM, BN>(n0, diag, nq, left, right);
        ++cases;
        bool ok = b.first <= b.unmasked_begin && b.unmasked_begin <= b.unmasked_end && b.unmasked_end <= b.end
                  && (b.end <= b.first || (b.first >= 0 && b.end <= nblocks));
        for (int m = 0; m < nblocks; ++m) {
            bool any = false, all = true;
            for (int i = m * BM; i < m * BM + BM && i < nq; ++i)
                for (int j = n0; j < n0 + BN && j < nk; ++j) { bool s = sees(i, j); any |= s; all &= s; }
            const bool inside = m >= b.first && m < b.end;
            const bool unmasked = m >= b.unmasked_begin && m < b.unmasked_end;
            if (any && !inside) ok = false;
            if (unmasked && !all) ok = false;
        }
        if (!ok && bad++ < 5) printf("queries BM=%d BN=%d nq=%d nk=%d n0=%d left=%d right=%d: got %d %d %d %d\n", BM, BN, nq, nk, n0, left, right, b.first, b.end, b.unmasked_begin, b.unmasked_end);
    }
    });
    printf("queries BM=%d BN=%d: %d cases, %d bad\n", BM, BN, cases, bad);
    return bad;
}
int main() {
    return check<16, 8>() + check<8, 16>() + check<12, 4>() + check_queries<16, 8>() + check_queries<8, 16>()
           + check_queries<12, 4>() != 0;
}
