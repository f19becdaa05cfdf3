/* Verifies, but answers 7: neither CPU nor GPU, so the module falls back. */
#include "lake_policy.h"

int decide(struct __sk_buff *skb)
{
	return 7;
}
