/* placeholder: replaced by the real client */
int main(void) { return 1; }
