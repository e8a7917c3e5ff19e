// Input helpers shared by the host harnesses (harness.cpp, attention.cpp): the whole input file
// as bytes, and a little-endian reader over it.
#pragma once
#include <cstdio>
#include <cstring>
#include <vector>

static std::vector<unsigned char> slurp(const char* path) {
    std::vector<unsigned char> v;
    FILE* f = std::fopen(path, "rb");
    if (!f) return v;
    int c;
    while ((c = std::fgetc(f)) != EOF) v.push_back((unsigned char)c);
    std::fclose(f);
    return v;
}

struct Reader {
    const unsigned char* p;
    template <typename T> T get() { T v; std::memcpy(&v, p, sizeof v); p += sizeof v; return v; }
    // n elements (one more allocated, so that .data() of an empty read is still valid).
    template <typename T> std::vector<T> vec(size_t n) {
        std::vector<T> v(n + 1);
        std::memcpy(v.data(), p, n * sizeof(T));
        p += n * sizeof(T);
        return v;
    }
};
