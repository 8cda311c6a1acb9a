/*
 * The instances computed in float (REAL float) of one kernel set and one
 * kind of products, included by kernel_set.h once per kind: float32,
 * bfloat16 and float16 storage.  PRODUCTS_TAG names the kind (exact, bf16),
 * and with it the instances: attend_<dtype>_<PRODUCTS_TAG>_<ISA>, ...
 */
#define SUFFIX PA_CAT(f32, PA_CAT(PRODUCTS_TAG, ISA))
#include "attention_body.h"
#undef SUFFIX

#define STORE uint16_t
#define STORE_KIND STORE_KIND_BF16
#define TO_REAL(x) PA_CAT(bf16_to_float, ISA)(x)
#define FROM_REAL(x) PA_CAT(float_to_bf16, ISA)(x)
#define SUFFIX PA_CAT(bf16, PA_CAT(PRODUCTS_TAG, ISA))
#include "attention_body.h"
#undef SUFFIX

/* float16 through the compiler's _Float16: F16C instructions where the
 * target has them, libgcc's conversions otherwise. */
#ifdef __FLT16_MAX__
#define STORE _Float16
#define STORE_KIND STORE_KIND_F16
#define TO_REAL(x) ((float)(x))
#define FROM_REAL(x) ((_Float16)(x))
#define SUFFIX PA_CAT(f16, PA_CAT(PRODUCTS_TAG, ISA))
#include "attention_body.h"
#undef SUFFIX
#endif
