/* Does not compile. */
#include "lake_policy.h"

int decide(struct __sk_buff *skb)
{
	return undefined_symbol;
}
