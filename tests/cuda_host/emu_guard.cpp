// Touches the emulated device's memory as a faulty kernel or copy would (tests/cuda_emulated.rs):
// `inside` reads the last byte of a 1000-byte buffer's 1024 (its rounding to 256) and exits 0;
// `past` reads the byte after them; `freed` writes a buffer after cuMemFree. The last two must
// stop the process with the emulator's report.
#include <cstdio>
#include <cstring>

extern "C" int cuMemAlloc_v2(unsigned long long* p, size_t bytes);
extern "C" int cuMemFree_v2(unsigned long long p);

int main(int argc, char** argv) {
    if (argc != 2) return 2;
    unsigned long long d = 0, other = 0;
    if (cuMemAlloc_v2(&d, 1000) != 0 || cuMemAlloc_v2(&other, 1000) != 0) return 3;
    volatile unsigned char* p = (volatile unsigned char*)d;
    if (std::strcmp(argv[1], "inside") == 0) {
        std::printf("%u\n", (unsigned)p[1023]);
        return 0;
    }
    if (std::strcmp(argv[1], "past") == 0) {
        std::printf("%u\n", (unsigned)p[1024]);
        return 0;
    }
    if (std::strcmp(argv[1], "freed") == 0) {
        if (cuMemFree_v2(d) != 0) return 4;
        p[8] = 1;
        return 0;
    }
    return 2;
}
